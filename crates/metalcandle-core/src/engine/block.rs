//! One pre-norm decoder block, forward and backward side by side. With N = B*T rows:
//!
//! ```text
//! forward                                   backward (dres = dL/d out on entry, dL/d x on exit)
//! ln1 = norm1(x)                            dW_down += dres^T h; db_down += colsum(dres)
//! q|k|v = ln1 W_{q,k,v}^T + b               dh = dres W_down
//! q, k = rope(q), rope(k)                   dgate, dup = act'(...) from dh (h = act(gate)*up)
//! att = attention(q, k, v)                  dW_gate += dgate^T ln2; dW_up += dup^T ln2 (+ biases)
//! x2 = x + att W_o^T + b_o                  dln2 = dgate W_gate + dup W_up
//! ln2 = norm2(x2)                           dres += norm2'(dln2)           (now dL/d x2)
//! gate|up = ln2 W_{gate,up}^T + b           dW_o += dres^T att; datt = dres W_o
//! h = act(gate) * up   (or act(up))         dq, dk, dv = attention'(datt)
//! out = x2 + h W_down^T + b_down            dq, dk = rope^-1(dq), rope^-1(dk)
//!                                           dW_{q,k,v} += d{q,k,v}^T ln1; dln1 = sum d{q,k,v} W
//!                                           dres += norm1'(dln1)           (now dL/d x)
//! ```
//! Every parameter gradient accumulates (`+=`) into the flat gradient buffer, so micro-batches
//! and tied weights sum in place.

use super::buffers::{Acts, Grads, LoraSlot};
use super::kernels::{
    add_assign, linear_bwd, linear_fwd, lora_bwd, lora_fwd, mlp_act_bwd, mlp_act_fwd, norm_bwd,
    norm_fwd, rope_in_place, NormParams,
};
use super::{Lin, NormPlan, StepCtx};
use crate::ops::dropout::{Dropout, Site};
use crate::ops::flash_attention::{flash_backward, flash_forward, FlashShape};
use crate::spec::{Activation, AttentionSpec};

pub struct BlockPlan {
    pub layer: usize,
    pub n1: NormPlan,
    pub q: Lin,
    pub k: Lin,
    pub v: Lin,
    pub o: Lin,
    pub n2: NormPlan,
    pub gate: Option<Lin>,
    pub up: Lin,
    pub down: Lin,
    pub attn: AttentionSpec,
    pub act: Activation,
    /// Index of the layer's RoPE tables in the step context.
    pub rope: Option<usize>,
}

impl BlockPlan {
    fn shape(&self, c: &StepCtx) -> FlashShape {
        FlashShape {
            batch: c.batch,
            seq: c.seq,
            heads: self.attn.num_heads,
            kv_heads: self.attn.num_kv_heads,
            head_dim: self.attn.head_dim,
            window: self.attn.sliding_window,
            scale: (1.0 / (self.attn.head_dim as f64).sqrt()) as f32,
            dropout: c.dropout.map(|d| {
                d.at(Site::AttnProbs(self.layer))
                    .rows(self.attn.num_heads * c.seq * c.seq)
            }),
        }
    }

    /// The masks of the two residual branches (attention, MLP) when training with dropout.
    fn branch_dropout(&self, c: &StepCtx) -> Option<(Dropout, Dropout)> {
        let (d, row) = (c.dropout?, c.seq * c.hidden);
        Some((
            d.at(Site::AttnOut(self.layer)).rows(row),
            d.at(Site::MlpOut(self.layer)).rows(row),
        ))
    }

    /// `out = block(x)`, keeping in `a` what the backward needs.
    pub fn forward(&self, c: &StepCtx, x: &[f32], a: &mut Acts, out: &mut [f32]) {
        let n = c.batch * c.seq;
        let (hs, nh, nkv, hd) = (
            c.hidden,
            self.attn.num_heads,
            self.attn.num_kv_heads,
            self.attn.head_dim,
        );
        let (qw, kvw) = (nh * hd, nkv * hd);
        let n1 = c.norm(&self.n1);
        norm_fwd(&n1, x, &mut a.ln1[..n * hs], &mut a.mean1, &mut a.rstd1);
        for (lin, buf, slot) in [
            (&self.q, &mut a.q, LoraSlot::Q),
            (&self.k, &mut a.k, LoraSlot::K),
            (&self.v, &mut a.v, LoraSlot::V),
        ] {
            linear_fwd(&a.ln1, c.w(lin), c.b(lin), n, hs, lin.rows, buf, lin.rows);
            adapt(c, lin, &a.ln1, n, buf, lin.rows, &mut a.lora[slot as usize]);
        }
        if let Some(r) = self.rope {
            let (cos, sin) = &c.rope[r];
            rope_in_place(&mut a.q, qw, n, 0, nh, hd, c.seq, cos, sin, false);
            rope_in_place(&mut a.k, kvw, n, 0, nkv, hd, c.seq, cos, sin, false);
        }
        let s = self.shape(c);
        flash_forward(
            &s,
            &a.q,
            qw,
            &a.k,
            kvw,
            &a.v,
            kvw,
            c.key_mask,
            &mut a.att[..n * qw],
            &mut a.lse[..n * nh],
        );
        linear_fwd(&a.att, c.w(&self.o), c.b(&self.o), n, qw, hs, &mut a.x2, hs);
        adapt(
            c,
            &self.o,
            &a.att,
            n,
            &mut a.x2,
            hs,
            &mut a.lora[LoraSlot::O as usize],
        );
        let drop = self.branch_dropout(c);
        if let Some((d, _)) = drop {
            d.apply_par(&mut a.x2[..n * hs]);
        }
        add_assign(&mut a.x2[..n * hs], x);
        let n2 = c.norm(&self.n2);
        norm_fwd(
            &n2,
            &a.x2[..n * hs],
            &mut a.ln2[..n * hs],
            &mut a.mean2,
            &mut a.rstd2,
        );
        let ff = self.up.rows;
        if let Some(g) = &self.gate {
            linear_fwd(&a.ln2, c.w(g), c.b(g), n, hs, ff, &mut a.gate, ff);
            let h = &mut a.lora[LoraSlot::Gate as usize];
            adapt(c, g, &a.ln2, n, &mut a.gate, ff, h);
        }
        linear_fwd(
            &a.ln2,
            c.w(&self.up),
            c.b(&self.up),
            n,
            hs,
            ff,
            &mut a.up,
            ff,
        );
        let h = &mut a.lora[LoraSlot::Up as usize];
        adapt(c, &self.up, &a.ln2, n, &mut a.up, ff, h);
        let gate = self.gate.as_ref().map(|_| &a.gate[..n * ff]);
        mlp_act_fwd(self.act, gate, &a.up[..n * ff], &mut a.h);
        linear_fwd(&a.h, c.w(&self.down), c.b(&self.down), n, ff, hs, out, hs);
        let h = &mut a.lora[LoraSlot::Down as usize];
        adapt(c, &self.down, &a.h, n, out, hs, h);
        if let Some((_, d)) = drop {
            d.apply_par(&mut out[..n * hs]);
        }
        add_assign(&mut out[..n * hs], &a.x2[..n * hs]);
    }

    /// Turns `g.dres` from dL/d out into dL/d x, accumulating the parameter gradients.
    pub fn backward(&self, c: &StepCtx, x: &[f32], a: &Acts, g: &mut Grads) {
        let n = c.batch * c.seq;
        let (hs, nh, nkv, hd) = (
            c.hidden,
            self.attn.num_heads,
            self.attn.num_kv_heads,
            self.attn.head_dim,
        );
        let (qw, kvw, ff) = (nh * hd, nkv * hd, self.up.rows);
        let nhs = n * hs;
        let drop = self.branch_dropout(c);
        // MLP
        let d = &self.down;
        let dy = branch_grad(drop.map(|d| d.1), &g.dres[..nhs], &mut g.dbranch);
        linear_bwd(
            &a.h,
            c.w(d),
            dy,
            hs,
            n,
            ff,
            hs,
            c.gw(d),
            c.gb(d),
            Some((&mut g.dh, false)),
        );
        let h = &a.lora[LoraSlot::Down as usize];
        adapt_bwd(c, d, &a.h, h, dy, hs, n, &mut g.dlora, &mut g.dh);
        let gate = self.gate.as_ref().map(|_| &a.gate[..n * ff]);
        mlp_act_bwd(
            self.act,
            gate,
            &a.up[..n * ff],
            &g.dh[..n * ff],
            &mut g.dgate,
            &mut g.dup,
        );
        let mut acc = false;
        if let Some(gl) = &self.gate {
            linear_bwd(
                &a.ln2,
                c.w(gl),
                &g.dgate,
                ff,
                n,
                hs,
                ff,
                c.gw(gl),
                c.gb(gl),
                Some((&mut g.dln, acc)),
            );
            let h = &a.lora[LoraSlot::Gate as usize];
            adapt_bwd(c, gl, &a.ln2, h, &g.dgate, ff, n, &mut g.dlora, &mut g.dln);
            acc = true;
        }
        let u = &self.up;
        linear_bwd(
            &a.ln2,
            c.w(u),
            &g.dup,
            ff,
            n,
            hs,
            ff,
            c.gw(u),
            c.gb(u),
            Some((&mut g.dln, acc)),
        );
        let h = &a.lora[LoraSlot::Up as usize];
        adapt_bwd(c, u, &a.ln2, h, &g.dup, ff, n, &mut g.dlora, &mut g.dln);
        let n2 = c.norm(&self.n2);
        let (dw2, db2) = c.norm_grads(&self.n2);
        norm_bwd(
            &n2,
            &a.x2[..nhs],
            &a.mean2,
            &a.rstd2,
            &g.dln[..nhs],
            &mut g.dres[..nhs],
            dw2,
            db2,
        );
        // attention
        let o = &self.o;
        let dy = branch_grad(drop.map(|d| d.0), &g.dres[..nhs], &mut g.dbranch);
        linear_bwd(
            &a.att,
            c.w(o),
            dy,
            hs,
            n,
            qw,
            hs,
            c.gw(o),
            c.gb(o),
            Some((&mut g.datt, false)),
        );
        let h = &a.lora[LoraSlot::O as usize];
        adapt_bwd(c, o, &a.att, h, dy, hs, n, &mut g.dlora, &mut g.datt);
        let s = self.shape(c);
        flash_backward(
            &s,
            &a.q,
            qw,
            &a.k,
            kvw,
            &a.v,
            kvw,
            c.key_mask,
            &a.att[..n * qw],
            &a.lse[..n * nh],
            &g.datt[..n * qw],
            &mut g.dq[..n * qw],
            &mut g.dk[..n * kvw],
            &mut g.dv[..n * kvw],
        );
        if let Some(r) = self.rope {
            let (cos, sin) = &c.rope[r];
            rope_in_place(&mut g.dq, qw, n, 0, nh, hd, c.seq, cos, sin, true);
            rope_in_place(&mut g.dk, kvw, n, 0, nkv, hd, c.seq, cos, sin, true);
        }
        let slots = [LoraSlot::Q, LoraSlot::K, LoraSlot::V];
        for (i, (lin, dy)) in [(&self.q, &g.dq), (&self.k, &g.dk), (&self.v, &g.dv)]
            .into_iter()
            .enumerate()
        {
            linear_bwd(
                &a.ln1,
                c.w(lin),
                dy,
                lin.rows,
                n,
                hs,
                lin.rows,
                c.gw(lin),
                c.gb(lin),
                Some((&mut g.dln, i > 0)),
            );
            let h = &a.lora[slots[i] as usize];
            adapt_bwd(c, lin, &a.ln1, h, dy, lin.rows, n, &mut g.dlora, &mut g.dln);
        }
        let n1 = c.norm(&self.n1);
        let (dw1, db1) = c.norm_grads(&self.n1);
        norm_bwd(
            &n1,
            &x[..nhs],
            &a.mean1,
            &a.rstd1,
            &g.dln[..nhs],
            &mut g.dres[..nhs],
            dw1,
            db1,
        );
    }
}

/// The gradient of a residual branch's output: the residual gradient itself, or that gradient
/// through the branch's dropout mask (redrawn, not kept), written to `scratch`.
fn branch_grad<'g>(d: Option<Dropout>, dres: &'g [f32], scratch: &'g mut [f32]) -> &'g [f32] {
    match d {
        None => dres,
        Some(d) => {
            let out = &mut scratch[..dres.len()];
            out.copy_from_slice(dres);
            d.apply_par(out);
            out
        }
    }
}

/// `y += s (x A^T) B^T` when `lin` carries a LoRA branch, keeping x A^T in `h`.
fn adapt(c: &StepCtx, lin: &Lin, x: &[f32], n: usize, y: &mut [f32], ldy: usize, h: &mut [f32]) {
    if let Some((p, la, lb)) = c.lora(lin) {
        let h = &mut h[..n * p.rank];
        lora_fwd(x, la, lb, p.scaling, n, lin.inp, lin.rows, h, y, ldy);
    }
}

/// The backward of `adapt`: the LoRA gradients, and its share of dx added to `dx`.
#[allow(clippy::too_many_arguments)]
fn adapt_bwd(
    c: &StepCtx,
    lin: &Lin,
    x: &[f32],
    h: &[f32],
    dy: &[f32],
    ldy: usize,
    n: usize,
    dh: &mut [f32],
    dx: &mut [f32],
) {
    if let Some((p, la, lb)) = c.lora(lin) {
        let (h, dh) = (&h[..n * p.rank], &mut dh[..n * p.rank]);
        let grads = c.lora_grads(lin);
        lora_bwd(
            x, la, lb, p.scaling, h, dy, ldy, n, lin.inp, lin.rows, grads, dh, dx,
        );
    }
}

impl StepCtx<'_> {
    fn norm(&self, p: &NormPlan) -> NormParams<'_> {
        NormParams {
            w: self.params[p.w],
            b: p.b.map(|b| self.params[b]),
            eps: p.eps,
            layer_norm: p.layer_norm,
        }
    }
}

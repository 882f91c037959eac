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
    add_assign, linear_bwd, linear_fwd, lora_bwd, lora_fwd, mlp_act_bwd, mlp_act_fwd, rope_in_place,
};
use super::{Lin, NormPlan, StepCtx};
use crate::ops::dropout::{Dropout, Site};
use crate::ops::flash_attention::{flash_backward, flash_forward, FlashShape, Strided};
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

    /// The row widths of q and of k (and v): [N, Q] and [N, KV].
    fn qkv_widths(&self) -> (usize, usize) {
        let hd = self.attn.head_dim;
        (self.attn.num_heads * hd, self.attn.num_kv_heads * hd)
    }

    /// RoPE on q and k (or, `inverse`, its backward on dq and dk) when the layer has it.
    fn rope(&self, c: &StepCtx, q: &mut [f32], k: &mut [f32], inverse: bool) {
        let Some(r) = self.rope else { return };
        let (cos, sin) = &c.rope[r];
        let (n, hd, (qw, kvw)) = (c.batch * c.seq, self.attn.head_dim, self.qkv_widths());
        let (nh, nkv) = (self.attn.num_heads, self.attn.num_kv_heads);
        rope_in_place(q, qw, n, 0, nh, hd, c.seq, cos, sin, inverse);
        rope_in_place(k, kvw, n, 0, nkv, hd, c.seq, cos, sin, inverse);
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
        let (n, hs, nh) = (c.batch * c.seq, c.hidden, self.attn.num_heads);
        let (qw, kvw) = self.qkv_widths();
        c.norm_fwd(
            &self.n1,
            x,
            &mut a.ln1[..n * hs],
            &mut a.mean1,
            &mut a.rstd1,
        );
        for (lin, buf, slot) in [
            (&self.q, &mut a.q, LoraSlot::Q),
            (&self.k, &mut a.k, LoraSlot::K),
            (&self.v, &mut a.v, LoraSlot::V),
        ] {
            c.lin_fwd(lin, &a.ln1, buf, &mut a.lora[slot as usize]);
        }
        self.rope(c, &mut a.q, &mut a.k, false);
        let qkv = [(&a.q, qw), (&a.k, kvw), (&a.v, kvw)].map(|(x, w)| Strided::new(x, w));
        let (att, lse) = (&mut a.att[..n * qw], &mut a.lse[..n * nh]);
        flash_forward(&self.shape(c), qkv, c.key_mask, att, lse);
        let h = &mut a.lora[LoraSlot::O as usize];
        c.lin_fwd(&self.o, &a.att, &mut a.x2, h);
        let drop = self.branch_dropout(c);
        if let Some((d, _)) = drop {
            d.apply_par(&mut a.x2[..n * hs]);
        }
        add_assign(&mut a.x2[..n * hs], x);
        let (x2, ln2) = (&a.x2[..n * hs], &mut a.ln2[..n * hs]);
        c.norm_fwd(&self.n2, x2, ln2, &mut a.mean2, &mut a.rstd2);
        let ff = self.up.rows;
        if let Some(g) = &self.gate {
            let h = &mut a.lora[LoraSlot::Gate as usize];
            c.lin_fwd(g, &a.ln2, &mut a.gate, h);
        }
        let h = &mut a.lora[LoraSlot::Up as usize];
        c.lin_fwd(&self.up, &a.ln2, &mut a.up, h);
        let gate = self.gate.as_ref().map(|_| &a.gate[..n * ff]);
        mlp_act_fwd(self.act, gate, &a.up[..n * ff], &mut a.h);
        let h = &mut a.lora[LoraSlot::Down as usize];
        c.lin_fwd(&self.down, &a.h, out, h);
        if let Some((_, d)) = drop {
            d.apply_par(&mut out[..n * hs]);
        }
        add_assign(&mut out[..n * hs], &a.x2[..n * hs]);
    }

    /// Turns `g.dres` from dL/d out into dL/d x, accumulating the parameter gradients.
    pub fn backward(&self, c: &StepCtx, x: &[f32], a: &Acts, g: &mut Grads) {
        let (n, hs, nh) = (c.batch * c.seq, c.hidden, self.attn.num_heads);
        let ((qw, kvw), ff) = (self.qkv_widths(), self.up.rows);
        let nhs = n * hs;
        let drop = self.branch_dropout(c);
        // MLP
        let dy = branch_grad(drop.map(|d| d.1), &g.dres[..nhs], &mut g.dbranch);
        let h = &a.lora[LoraSlot::Down as usize];
        c.lin_bwd(&self.down, &a.h, h, dy, (&mut g.dh, false), &mut g.dlora);
        let gate = self.gate.as_ref().map(|_| &a.gate[..n * ff]);
        mlp_act_bwd(
            self.act,
            gate,
            &a.up[..n * ff],
            &g.dh[..n * ff],
            &mut g.dgate,
            &mut g.dup,
        );
        if let Some(gl) = &self.gate {
            let h = &a.lora[LoraSlot::Gate as usize];
            c.lin_bwd(gl, &a.ln2, h, &g.dgate, (&mut g.dln, false), &mut g.dlora);
        }
        let (h, acc) = (&a.lora[LoraSlot::Up as usize], self.gate.is_some());
        c.lin_bwd(&self.up, &a.ln2, h, &g.dup, (&mut g.dln, acc), &mut g.dlora);
        let (dy, dx) = (&g.dln[..nhs], &mut g.dres[..nhs]);
        c.norm_bwd(&self.n2, &a.x2[..nhs], (&a.mean2, &a.rstd2), dy, dx);
        // attention
        let dy = branch_grad(drop.map(|d| d.0), &g.dres[..nhs], &mut g.dbranch);
        let h = &a.lora[LoraSlot::O as usize];
        c.lin_bwd(&self.o, &a.att, h, dy, (&mut g.datt, false), &mut g.dlora);
        let qkv = [(&a.q, qw), (&a.k, kvw), (&a.v, kvw)].map(|(x, w)| Strided::new(x, w));
        flash_backward(
            &self.shape(c),
            qkv,
            c.key_mask,
            &a.att[..n * qw],
            &a.lse[..n * nh],
            &g.datt[..n * qw],
            &mut g.dq[..n * qw],
            &mut g.dk[..n * kvw],
            &mut g.dv[..n * kvw],
        );
        self.rope(c, &mut g.dq, &mut g.dk, true);
        let slots = [LoraSlot::Q, LoraSlot::K, LoraSlot::V];
        for (i, (lin, dy)) in [(&self.q, &g.dq), (&self.k, &g.dk), (&self.v, &g.dv)]
            .into_iter()
            .enumerate()
        {
            let h = &a.lora[slots[i] as usize];
            c.lin_bwd(lin, &a.ln1, h, dy, (&mut g.dln, i > 0), &mut g.dlora);
        }
        let (dy, dx) = (&g.dln[..nhs], &mut g.dres[..nhs]);
        c.norm_bwd(&self.n1, &x[..nhs], (&a.mean1, &a.rstd1), dy, dx);
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

impl StepCtx<'_> {
    /// `y = x W^T + b` over the step's rows ([N, lin.rows]), plus `s (x A^T) B^T` when `lin`
    /// carries a LoRA branch, keeping x A^T in `h`.
    fn lin_fwd(&self, lin: &Lin, x: &[f32], y: &mut [f32], h: &mut [f32]) {
        let (n, ld) = (self.batch * self.seq, lin.rows);
        linear_fwd(x, self.w(lin), self.b(lin), n, lin.inp, ld, y, ld);
        if let Some((p, la, lb)) = self.lora(lin) {
            let h = &mut h[..n * p.rank];
            lora_fwd(x, la, lb, p.scaling, n, lin.inp, ld, h, y, ld);
        }
    }

    /// The backward of `lin_fwd` for dy [N, lin.rows]: the parameter (and LoRA) gradients
    /// accumulate, and dx is written, or added to when `dx.1` is true; `dh` is LoRA scratch.
    fn lin_bwd(
        &self,
        lin: &Lin,
        x: &[f32],
        h: &[f32],
        dy: &[f32],
        (dx, acc): (&mut [f32], bool),
        dh: &mut [f32],
    ) {
        let (n, ld) = (self.batch * self.seq, lin.rows);
        let (gw, gb) = (self.gw(lin), self.gb(lin));
        let w = self.w(lin);
        linear_bwd(x, w, dy, ld, n, lin.inp, ld, gw, gb, Some((&mut *dx, acc)));
        if let Some((p, la, lb)) = self.lora(lin) {
            let (h, dh) = (&h[..n * p.rank], &mut dh[..n * p.rank]);
            let grads = self.lora_grads(lin);
            lora_bwd(
                x, la, lb, p.scaling, h, dy, ld, n, lin.inp, ld, grads, dh, dx,
            );
        }
    }
}

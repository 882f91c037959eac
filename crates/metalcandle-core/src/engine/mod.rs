//! The fused CPU training path: the decoder's forward and backward on raw f32 slices of the
//! model's own parameter tensors, into buffers allocated once per (batch, sequence) shape,
//! with every parameter gradient accumulated in place into one flat buffer (named-parameter
//! order, so a data-parallel all-reduce is one call). The composed per-op path
//! (`train::train_step` without this module) stays the reference and the fallback:
//! `ineligible` says, for a model, why a step cannot run here.

mod block;
mod buffers;
mod kernels;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::hooks::Hooks;
use crate::model::{Decoder, ForwardOptions};
use crate::nn::attention::QkvProj;
use crate::nn::{Linear, Norm};
use crate::ops::cross_entropy::IGNORE_INDEX;
use crate::ops::dropout::{Dropout, Site};
use crate::ops::head_loss::head_loss_core;
use crate::optim::Grads;
use crate::spec::{MlpKind, NormKind, Positions};
use crate::train::{Batch, Masks, StepOptions};
use block::BlockPlan;
use buffers::{Buffers, Dims};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use std::collections::HashMap;

/// A linear's weight rows `row0 .. row0 + rows` (all of them, or one of q/k/v of a fused
/// projection), as indices into the named parameters.
pub(crate) struct Lin {
    w: usize,
    b: Option<usize>,
    inp: usize,
    row0: usize,
    rows: usize,
    lora: Option<LoraPlan>,
}

/// A linear's LoRA branch `s * B A` (A [r, in], B [out, r]; the Lin's rows of B).
pub(crate) struct LoraPlan {
    a: usize,
    b: usize,
    rank: usize,
    scaling: f32,
}

pub(crate) struct NormPlan {
    w: usize,
    b: Option<usize>,
    eps: f32,
    layer_norm: bool,
}

/// Where each piece of the model lives among its named parameters.
struct Plan {
    embed: usize,
    pos: Option<usize>,
    blocks: Vec<BlockPlan>,
    final_norm: NormPlan,
    /// None when tied to the embedding.
    head: Option<usize>,
    dims: Dims,
}

/// Why a model's step cannot take the fused path, or None when it can.
pub fn ineligible(model: &Decoder) -> Option<String> {
    if !model.device.is_cpu() {
        return Some(format!("the model is on {:?}, not the CPU", model.device));
    }
    if model.dtype != DType::F32 {
        return Some(format!("the model is {:?}, not f32", model.dtype));
    }
    if model.is_quantized() {
        return Some("the model has quantized weights".into());
    }
    let adapted: Vec<_> = model
        .linears()
        .into_iter()
        .filter_map(|l| l.lora.as_ref())
        .collect();
    if adapted.iter().any(|l| l.merged) {
        return Some("the adapter is merged into the base weights".into());
    }
    if adapted.iter().any(|l| l.dropout > 0.0) {
        return Some("LoRA dropout is on".into());
    }
    if !model.hooks.aux_losses().is_empty() {
        return Some("an auxiliary loss is attached".into());
    }
    // Hooks between blocks run as islands (see `Island`); one inside a block needs its ops.
    let inner = crate::hooks::point_names(model.blocks.len())
        .into_iter()
        .filter(|p| !is_boundary(p))
        .find(|p| model.hooks.touches(p));
    if let Some(p) = inner {
        return Some(format!("a hook at `{p}`, inside a block or the head"));
    }
    if !model.hooks.update_transforms().is_empty() {
        return Some("a gradient transform is attached".into());
    }
    if model.blocks.iter().any(|b| b.mlp.spec.fused_gate_up) {
        return Some("the MLP's gate and up projections are fused (gate_up_proj)".into());
    }
    if model.lm_head.as_ref().is_some_and(|l| l.bias.is_some()) {
        return Some("the LM head has a bias".into());
    }
    let mut bad = None;
    for (name, t) in model.parameters() {
        if !t.is_contiguous() && bad.is_none() {
            bad = Some(format!("parameter `{name}` is not contiguous"));
        }
    }
    bad
}

/// Reusable state of the fused path for one (batch, sequence, checkpointing) shape.
pub struct Engine {
    key: (usize, usize, bool),
    bufs: Buffers,
    /// cos and sin [T, head_dim / 2] per layer (RoPE models)
    rope: Vec<(Vec<f32>, Vec<f32>)>,
    /// sinusoidal positions [T, hidden]
    sinusoid: Option<Vec<f32>>,
    /// The step's gradients, one buffer in the trainable parameters' order, and each one's
    /// offset in it; the optimizer reads them in place.
    flat: Vec<f32>,
    offsets: HashMap<String, usize>,
}

/// The engine a model keeps between steps. A clone of the model starts without one.
#[derive(Default)]
pub struct Slot(Option<Box<Engine>>);

impl Clone for Slot {
    fn clone(&self) -> Self {
        Slot(None)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(e) => write!(f, "Engine({:?})", e.key),
            None => write!(f, "Engine(none)"),
        }
    }
}

/// What one step's forward and backward hand back to the shared tail of `train_step`; the
/// gradients themselves stay in the engine's flat buffer (see [`gradients`]).
pub(crate) struct Accumulated {
    pub loss: f64,
    /// The norm of all gradients before clipping.
    pub grad_norm: f64,
}

/// The last fused step's gradients (clipped when a maximum norm was given), for the optimizer.
pub(crate) fn gradients(model: &Decoder) -> Option<Grads<'_>> {
    model.engine.0.as_ref().map(|e| Grads::Flat {
        buf: &e.flat,
        at: &e.offsets,
    })
}

/// `||g||`: f64 partial sums over fixed blocks in 8 lanes, added in block order, so the same
/// gradients give the same bits whatever the thread count.
fn flat_norm(g: &[f32]) -> f64 {
    use rayon::prelude::*;
    let partial: Vec<f64> = g
        .par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0f64; 8];
            let chunks = c.chunks_exact(8);
            let tail: f64 = chunks.remainder().iter().map(|x| (*x as f64).powi(2)).sum();
            for ch in chunks {
                for (a, x) in acc.iter_mut().zip(ch) {
                    *a += (*x as f64) * (*x as f64);
                }
            }
            acc.iter().sum::<f64>() + tail
        })
        .collect();
    partial.iter().sum::<f64>().sqrt()
}

/// torch's clip_grad_norm_ on the flat buffer in place: coef = min(1, max / (norm + 1e-6)).
fn clip_flat(g: &mut [f32], norm: f64, max: f64) {
    use rayon::prelude::*;
    let coef = (max as f32 / (norm as f32 + 1e-6)).min(1.0);
    if coef < 1.0 {
        g.par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
    }
}

/// The index of parameter `{module}.{name}` among the named parameters.
fn param(ix: &HashMap<String, usize>, module: &str, name: &str) -> Result<usize> {
    let full = format!("{module}.{name}");
    ix.get(&full)
        .copied()
        .ok_or_else(|| Error::Msg(format!("fused path: no parameter `{full}`")))
}

fn lin(ix: &HashMap<String, usize>, l: &Linear, row0: usize, rows: usize) -> Result<Lin> {
    let get = |name: &str| param(ix, &l.name, name);
    Ok(Lin {
        w: get("weight")?,
        b: l.bias.as_ref().map(|_| get("bias")).transpose()?,
        inp: l.in_features(),
        row0,
        rows,
        lora: match &l.lora {
            Some(a) => Some(LoraPlan {
                a: get("lora_A.weight")?,
                b: get("lora_B.weight")?,
                rank: a.a.dims()[0],
                scaling: a.scaling as f32,
            }),
            None => None,
        },
    })
}

fn norm(ix: &HashMap<String, usize>, n: &Norm) -> Result<NormPlan> {
    Ok(NormPlan {
        w: param(ix, &n.name, "weight")?,
        b: n.bias
            .as_ref()
            .map(|_| param(ix, &n.name, "bias"))
            .transpose()?,
        eps: n.spec.eps as f32,
        layer_norm: n.spec.kind == NormKind::LayerNorm,
    })
}

impl Plan {
    // Walks the blocks itself rather than `Decoder::modules`: a plan is per block, with q, k
    // and v as row ranges (of one fused projection in GPT-2), not a flat list of modules.
    fn new(model: &Decoder, ix: &HashMap<String, usize>) -> Result<Self> {
        let mut dims = Dims {
            hidden: model.spec.hidden_size,
            dropout: model.spec.dropout > 0.0,
            ..Default::default()
        };
        let mut blocks = vec![];
        for (i, b) in model.blocks.iter().enumerate() {
            let a = b.attn.spec;
            let (qw, kvw) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
            let (q, k, v) = match &b.attn.qkv {
                QkvProj::Separate { q, k, v } => {
                    (lin(ix, q, 0, qw)?, lin(ix, k, 0, kvw)?, lin(ix, v, 0, kvw)?)
                }
                QkvProj::Fused(l) => (
                    lin(ix, l, 0, qw)?,
                    lin(ix, l, qw, kvw)?,
                    lin(ix, l, qw + kvw, kvw)?,
                ),
            };
            let m = &b.mlp;
            let ff = m.spec.intermediate_size;
            let gate = match (m.spec.kind, &m.gate) {
                (MlpKind::Gated, Some(g)) => Some(lin(ix, g, 0, ff)?),
                _ => None,
            };
            dims.q = dims.q.max(qw);
            dims.kv = dims.kv.max(kvw);
            dims.ff = dims.ff.max(ff);
            dims.heads = dims.heads.max(a.num_heads);
            dims.gated |= gate.is_some();
            for l in [&q, &k, &v].into_iter().chain(gate.as_ref()) {
                dims.rank = dims.rank.max(l.lora.as_ref().map_or(0, |p| p.rank));
            }
            let (o, up) = (
                lin(ix, &b.attn.o, 0, model.spec.hidden_size)?,
                lin(ix, &m.up, 0, ff)?,
            );
            let down = lin(ix, &m.down, 0, model.spec.hidden_size)?;
            for l in [&o, &up, &down] {
                dims.rank = dims.rank.max(l.lora.as_ref().map_or(0, |p| p.rank));
            }
            blocks.push(BlockPlan {
                layer: i,
                n1: norm(ix, &b.attn_norm)?,
                q,
                k,
                v,
                o,
                n2: norm(ix, &b.mlp_norm)?,
                gate,
                up,
                down,
                attn: a,
                act: m.spec.activation,
                rope: matches!(model.spec.positions, Positions::Rope { .. }).then_some(i),
            });
        }
        let weight = |module: &str| param(ix, module, "weight");
        Ok(Plan {
            embed: weight(&model.embed.name)?,
            pos: model
                .pos_embed
                .as_ref()
                .map(|p| weight(&p.name))
                .transpose()?,
            blocks,
            final_norm: norm(ix, &model.final_norm)?,
            head: model
                .lm_head
                .as_ref()
                .map(|l| weight(&l.name))
                .transpose()?,
            dims,
        })
    }
}

/// Everything a block reads during one micro-batch: the parameters as slices, where each
/// trainable parameter's gradient lives in the flat buffer, and the per-shape tables.
pub(crate) struct StepCtx<'a> {
    batch: usize,
    seq: usize,
    hidden: usize,
    params: Vec<&'a [f32]>,
    /// Offset of each parameter's gradient in the flat buffer; None when frozen.
    grad_at: &'a [Option<usize>],
    grad_ptr: *mut f32,
    rope: &'a [(Vec<f32>, Vec<f32>)],
    key_mask: Option<&'a [i64]>,
    /// This micro-batch's dropout masks (ops/dropout.rs), redrawn in the backward.
    dropout: Option<Dropout>,
    /// The model's hooks when one visits a point between blocks.
    hooks: Option<&'a Hooks>,
}

// The gradient pointer is written only through `grad`, from one thread at a time per
// parameter range (kernels split their own work); everything else is shared reads.
unsafe impl Sync for StepCtx<'_> {}

impl StepCtx<'_> {
    fn w(&self, l: &Lin) -> &[f32] {
        &self.params[l.w][l.row0 * l.inp..(l.row0 + l.rows) * l.inp]
    }

    fn b(&self, l: &Lin) -> Option<&[f32]> {
        l.b.map(|b| &self.params[b][l.row0..l.row0 + l.rows])
    }

    /// The gradient of elements `range` of parameter `p`.
    // Each parameter's range of the flat buffer is disjoint from every other's, and each call
    // site holds one parameter's gradient only for the length of one kernel call, so no two
    // live mutable slices overlap.
    #[allow(clippy::mut_from_ref)]
    fn grad(&self, p: usize, range: std::ops::Range<usize>) -> Option<&mut [f32]> {
        let off = self.grad_at[p]?;
        debug_assert!(range.end <= self.params[p].len());
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.grad_ptr.add(off + range.start), range.len())
        })
    }

    fn gw(&self, l: &Lin) -> Option<&mut [f32]> {
        self.grad(l.w, l.row0 * l.inp..(l.row0 + l.rows) * l.inp)
    }

    fn gb(&self, l: &Lin) -> Option<&mut [f32]> {
        self.grad(l.b?, l.row0..l.row0 + l.rows)
    }

    /// A and this Lin's rows of B.
    fn lora<'l>(&'l self, l: &'l Lin) -> Option<(&'l LoraPlan, &'l [f32], &'l [f32])> {
        let p = l.lora.as_ref()?;
        let b = &self.params[p.b][l.row0 * p.rank..(l.row0 + l.rows) * p.rank];
        Some((p, self.params[p.a], b))
    }

    /// The gradients of A and of this Lin's rows of B.
    fn lora_grads(&self, l: &Lin) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
        let Some(p) = l.lora.as_ref() else {
            return (None, None);
        };
        let rows = l.row0 * p.rank..(l.row0 + l.rows) * p.rank;
        (
            self.grad(p.a, 0..self.params[p.a].len()),
            self.grad(p.b, rows),
        )
    }

    fn norm_grads(&self, n: &NormPlan) -> (Option<&mut [f32]>, Option<&mut [f32]>) {
        let d = self.params[n.w].len();
        (self.grad(n.w, 0..d), n.b.and_then(|b| self.grad(b, 0..d)))
    }

    fn norm(&self, p: &NormPlan) -> kernels::NormParams<'_> {
        kernels::NormParams {
            w: self.params[p.w],
            b: p.b.map(|b| self.params[b]),
            eps: p.eps,
            layer_norm: p.layer_norm,
        }
    }

    /// `y = norm(x)`, keeping each row's mean and 1/std for the backward.
    fn norm_fwd(&self, p: &NormPlan, x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
        kernels::norm_fwd(&self.norm(p), x, y, mean, rstd);
    }

    /// The backward of `norm_fwd` for dy: dx added to `dx`, the norm's own gradients
    /// accumulated.
    fn norm_bwd(
        &self,
        p: &NormPlan,
        x: &[f32],
        stats: (&[f32], &[f32]),
        dy: &[f32],
        dx: &mut [f32],
    ) {
        let (dw, db) = self.norm_grads(p);
        kernels::norm_bwd(&self.norm(p), x, stats.0, stats.1, dy, dx, dw, db);
    }
}

fn f32_slice<'a>(s: &'a Storage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => match l.contiguous_offsets() {
            Some((a, b)) => Ok(&v[a..b]),
            None => Err(Error::Msg(
                "fused path: a parameter is not contiguous".into(),
            )),
        },
        _ => Err(Error::Msg(
            "fused path: parameters must be f32 on the CPU".into(),
        )),
    }
}

impl Engine {
    fn new(model: &Decoder, plan: &Plan, key: (usize, usize, bool)) -> Result<Self> {
        let (b, t, ckpt) = key;
        let positions: Vec<i64> = (0..t as i64).collect();
        let mut rope = vec![];
        if let Some(tables) = model.rope_tables() {
            for tab in tables {
                let (c, s) =
                    tab.cos_sin(&positions, (1, t), DType::F32, &candle_core::Device::Cpu)?;
                rope.push((c.flatten_all()?.to_vec1()?, s.flatten_all()?.to_vec1()?));
            }
        }
        let sinusoid = match model.spec.positions {
            Positions::Sinusoidal => Some(
                crate::nn::embedding::sinusoidal(
                    &positions,
                    (1, t),
                    model.spec.hidden_size,
                    DType::F32,
                    &candle_core::Device::Cpu,
                )?
                .flatten_all()?
                .to_vec1()?,
            ),
            _ => None,
        };
        Ok(Engine {
            key,
            bufs: Buffers::new(b * t, plan.blocks.len(), &plan.dims, ckpt),
            rope,
            sinusoid,
            flat: vec![],
            offsets: HashMap::new(),
        })
    }
}

/// Forward and backward of every micro-batch on the fused path (`opts`: checkpointing, the
/// workers' reducer, clipping), the gradients summed over the workers and clipped in the
/// engine's flat buffer for the optimizer ([`gradients`]). `total` is the label-token count
/// over all workers.
pub(crate) fn accumulate(
    model: &mut Decoder,
    trainable: &[String],
    micro_batches: &[Batch],
    total: usize,
    masks: Masks,
    opts: StepOptions,
) -> Result<Accumulated> {
    let (b, t) = micro_batches[0].ids.dims2()?;
    let key = (b, t, opts.gradient_checkpointing);
    // The base parameters, then the adapter's (trainable when attached, the base frozen).
    let mut named = model.named_parameters();
    model.visit_adapter_mut(&mut |n, t| named.push((n.to_string(), t.clone())));
    let ix: HashMap<String, usize> = named
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.clone(), i))
        .collect();
    let plan = Plan::new(model, &ix)?;
    let mut engine = match model.engine.0.take() {
        Some(e) if e.key == key => e,
        _ => Box::new(Engine::new(model, &plan, key)?),
    };
    // The flat gradient buffer in the trainable parameters' order.
    let mut grad_at = vec![None; named.len()];
    let mut len = 0;
    for name in trainable {
        let i = ix[name];
        grad_at[i] = Some(len);
        len += named[i].1.elem_count();
    }
    engine.flat.clear();
    engine.flat.resize(len, 0.0);
    let mut loss = 0f64;
    {
        let guards: Vec<_> = named.iter().map(|(_, t)| t.storage_and_layout()).collect();
        let params = guards
            .iter()
            .map(|(s, l)| f32_slice(s, l))
            .collect::<Result<Vec<_>>>()?;
        let Engine {
            bufs,
            rope,
            sinusoid,
            flat,
            ..
        } = &mut *engine;
        for (micro, mb) in micro_batches.iter().enumerate() {
            if mb.ids.dims2()? != (b, t) {
                return Err(Error::Input(format!(
                    "micro-batches differ in shape: {:?} and {:?}",
                    mb.ids.dims(),
                    micro_batches[0].ids.dims()
                )));
            }
            let opts = ForwardOptions {
                attention_mask: mb.attention_mask.as_deref(),
                ..Default::default()
            };
            model.check_inputs(&mb.ids, 0, &opts)?;
            let labels = mb.shifted_labels()?;
            let n_valid = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
            if n_valid == 0 {
                continue;
            }
            let share = n_valid as f64 / total as f64;
            let ctx = StepCtx {
                batch: b,
                seq: t,
                hidden: model.spec.hidden_size,
                params: params.clone(),
                grad_at: &grad_at,
                grad_ptr: flat.as_mut_ptr(),
                rope,
                key_mask: mb.attention_mask.as_deref(),
                dropout: masks.of(micro),
                hooks: model.hooks.active().then_some(&model.hooks),
            };
            let ids: Vec<u32> = mb.ids.flatten_all()?.to_vec1()?;
            let vocab = model.spec.vocab_size;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(Error::Input(format!(
                    "token id {bad} is outside the vocabulary [0, {vocab})"
                )));
            }
            let main = step_micro_batch(
                &plan,
                &ctx,
                bufs,
                sinusoid.as_deref(),
                &ids,
                &labels,
                n_valid,
                share,
            )?;
            loss += (main * share as f32) as f64;
        }
    }
    if let Some(r) = opts.reducer {
        let mut l = [loss];
        r.sum_f64(&mut l)?;
        loss = l[0];
        r.sum_f32(&mut engine.flat)?;
    }
    let grad_norm = flat_norm(&engine.flat);
    if let Some(max) = opts.max_grad_norm {
        clip_flat(&mut engine.flat, grad_norm, max);
    }
    engine.offsets = trainable
        .iter()
        .map(|name| (name.clone(), grad_at[ix[name]].unwrap()))
        .collect();
    model.engine.0 = Some(engine);
    Ok(Accumulated { loss, grad_norm })
}

/// One micro-batch's forward, loss and backward; returns its mean loss.
#[allow(clippy::too_many_arguments)]
fn step_micro_batch(
    plan: &Plan,
    c: &StepCtx,
    bufs: &mut Buffers,
    sinusoid: Option<&[f32]>,
    ids: &[u32],
    labels: &[i64],
    n_valid: usize,
    share: f64,
) -> Result<f32> {
    let (n, hs) = (c.batch * c.seq, c.hidden);
    let dims = (c.batch, c.seq, hs);
    let island = |point: String, buf: &mut [f32]| Island::forward(c.hooks, point, buf, dims);
    let emb = c.params[plan.embed];
    let pos = plan.pos.map(|p| c.params[p]);
    kernels::for_rows(&mut bufs.res[0], hs, n, |i, r| {
        let tok = ids[i] as usize;
        r.copy_from_slice(&emb[tok * hs..(tok + 1) * hs]);
        let tpos = i % c.seq;
        if let Some(p) = pos {
            for (x, e) in r.iter_mut().zip(&p[tpos * hs..(tpos + 1) * hs]) {
                *x += *e;
            }
        }
        if let Some(s) = sinusoid {
            for (x, e) in r.iter_mut().zip(&s[tpos * hs..(tpos + 1) * hs]) {
                *x += *e;
            }
        }
    });
    let embed_drop = c.dropout.map(|d| d.at(Site::Embed).rows(c.seq * hs));
    if let Some(d) = embed_drop {
        d.apply_par(&mut bufs.res[0][..n * hs]);
    }
    let embed_island = island("embed".into(), &mut bufs.res[0][..n * hs])?;
    let layers = plan.blocks.len();
    let ckpt = bufs.acts.len() == 1 && layers > 1;
    let mut islands = Vec::with_capacity(layers);
    for (l, blk) in plan.blocks.iter().enumerate() {
        let (before, after) = bufs.res.split_at_mut(l + 1);
        let slot = if ckpt { 0 } else { l };
        blk.forward(c, &before[l], &mut bufs.acts[slot], &mut after[0]);
        islands.push(island(
            format!("layers.{l}.residual"),
            &mut after[0][..n * hs],
        )?);
    }
    let fnorm = &plan.final_norm;
    let (x, y) = (&bufs.res[layers], &mut bufs.lnf);
    c.norm_fwd(fnorm, x, y, &mut bufs.meanf, &mut bufs.rstdf);
    let final_island = island("final_norm".into(), &mut bufs.lnf[..n * hs])?;
    // The head: tied heads accumulate into the embedding's gradient.
    let head = plan.head.unwrap_or(plan.embed);
    let scale = (1.0 / n_valid as f64 * share) as f32;
    let g = &mut bufs.grads;
    let dhead = c.grad(head, 0..c.params[head].len());
    let rows = head_loss_core(
        &bufs.lnf,
        c.params[head],
        hs,
        labels,
        scale,
        Some(&mut g.dln[..n * hs]),
        dhead,
    );
    let main = rows.into_iter().sum::<f32>() / n_valid as f32;
    Island::backward(final_island, &mut g.dln[..n * hs])?;
    g.dres[..n * hs].fill(0.0);
    let stats = (&bufs.meanf[..], &bufs.rstdf[..]);
    let (dy, dx) = (&g.dln[..n * hs], &mut g.dres[..n * hs]);
    c.norm_bwd(fnorm, &bufs.res[layers], stats, dy, dx);
    for (l, blk) in plan.blocks.iter().enumerate().rev() {
        Island::backward(islands.pop().flatten(), &mut bufs.grads.dres[..n * hs])?;
        let slot = if ckpt { 0 } else { l };
        if ckpt {
            // Recompute the block's forward from its kept input: the same arithmetic, so the
            // same bits as the run that kept everything.
            // Its output overwrites the next block's kept input with the same values.
            let (before, after) = bufs.res.split_at_mut(l + 1);
            blk.forward(c, &before[l], &mut bufs.acts[0], &mut after[0]);
        }
        blk.backward(c, &bufs.res[l], &bufs.acts[slot], &mut bufs.grads);
    }
    // Embedding rows (and learned positions) collect the residual gradient.
    Island::backward(embed_island, &mut bufs.grads.dres[..n * hs])?;
    if let Some(d) = embed_drop {
        d.apply_par(&mut bufs.grads.dres[..n * hs]);
    }
    let g = &bufs.grads.dres;
    if let Some(de) = c.grad(plan.embed, 0..emb.len()) {
        for i in 0..n {
            let tok = ids[i] as usize;
            for (d, v) in de[tok * hs..(tok + 1) * hs]
                .iter_mut()
                .zip(&g[i * hs..(i + 1) * hs])
            {
                *d += *v;
            }
        }
    }
    if let Some(p) = plan.pos {
        if let Some(dp) = c.grad(p, 0..c.params[p].len()) {
            for i in 0..n {
                let tpos = i % c.seq;
                for (d, v) in dp[tpos * hs..(tpos + 1) * hs]
                    .iter_mut()
                    .zip(&g[i * hs..(i + 1) * hs])
                {
                    *d += *v;
                }
            }
        }
    }
    Ok(main)
}

/// Whether `point` lies between blocks, where the fused path runs its hooks as an [`Island`].
fn is_boundary(point: &str) -> bool {
    point == "embed" || point == "final_norm" || point.ends_with(".residual")
}

/// The hooks at a point between blocks, run as a small composed island: the point's value
/// becomes a variable, the hooks apply to it as on the composed path (the same actions, calls
/// and captures), the result replaces the buffer, and in the backward candle's autograd takes
/// the gradient at the point through them.
struct Island {
    x: Var,
    y: Tensor,
}

impl Island {
    fn forward(
        hooks: Option<&Hooks>,
        point: String,
        buf: &mut [f32],
        dims: (usize, usize, usize),
    ) -> Result<Option<Island>> {
        let Some(hooks) = hooks.filter(|h| h.touches(&point)) else {
            return Ok(None);
        };
        let x = Var::from_tensor(&Tensor::from_slice(buf, dims, &Device::Cpu)?)?;
        let y = hooks.apply(&point, x.as_tensor().clone())?;
        if y.id() == x.as_tensor().id() {
            // Only observers ran (captures): the value and its gradient pass unchanged.
            return Ok(None);
        }
        if y.dims() != x.dims() {
            return Err(Error::Input(format!(
                "a hook at \"{point}\" returned shape {:?}, expected {:?}",
                y.dims(),
                x.dims()
            )));
        }
        let values = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        buf.copy_from_slice(&values);
        Ok(Some(Island { x, y }))
    }

    /// `grad` from dL/dy to dL/dx; zero where nothing flows back through the hooks.
    fn backward(island: Option<Island>, grad: &mut [f32]) -> Result<()> {
        let Some(Island { x, y }) = island else {
            return Ok(());
        };
        let dy = Tensor::from_slice(grad, y.shape(), &Device::Cpu)?;
        let store = (y * dy)?.sum_all()?.backward()?;
        match store.get(x.as_tensor()) {
            Some(dx) => grad.copy_from_slice(&dx.flatten_all()?.to_vec1::<f32>()?),
            None => grad.fill(0.0),
        }
        Ok(())
    }
}

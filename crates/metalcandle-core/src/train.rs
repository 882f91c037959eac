//! One optimisation step: forward, loss, backward over micro-batches (gradients summed,
//! each micro-batch weighted by its share of the label tokens), global-norm clipping as torch
//! does it, and the optimizer update.
//!
//! Four files carry the word, one layer each: this step; its PyO3 binding
//! (`metalcandle-py/src/train.rs`); the Python `Trainer` that calls it (`trainer.py`); and the
//! run behind `metalcandle train` (`train.py`), named after the command.

use crate::error::{Error, Result};
use crate::model::{Decoder, ForwardOptions};
use crate::ops::dropout::Dropout;
use crate::ops::{self, cross_entropy::IGNORE_INDEX};
use crate::optim::Optimizer;
use crate::reduce::GradReducer;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

pub struct Batch {
    /// u32 [B, T]
    pub ids: Tensor,
    /// [B*T], unshifted (Hugging Face convention: position t predicts labels[t+1]), unless
    /// `pre_shifted`.
    pub labels: Vec<i64>,
    /// The labels are already the next-token targets (position t predicts labels[t]), as in
    /// nanoGPT's (x, y) windows: every position, the last included, has a target.
    pub pre_shifted: bool,
    /// [B*T], 1 = token, 0 = padding.
    pub attention_mask: Option<Vec<i64>>,
}

impl Batch {
    /// The target of every position: labels moved one step left within each row, the last
    /// position ignored (or the labels as they are when `pre_shifted`).
    pub(crate) fn shifted_labels(&self) -> Result<Vec<i64>> {
        let (b, t) = self.ids.dims2()?;
        if self.labels.len() != b * t {
            return Err(Error::Input(format!(
                "labels have {} entries, input_ids {b} x {t}",
                self.labels.len()
            )));
        }
        if self.pre_shifted {
            return Ok(self.labels.clone());
        }
        Ok((0..b * t)
            .map(|i| {
                if (i + 1) % t == 0 {
                    IGNORE_INDEX
                } else {
                    self.labels[i + 1]
                }
            })
            .collect())
    }
}

#[derive(Debug, Clone)]
pub struct StepStats {
    /// The main (cross-entropy) loss.
    pub loss: f64,
    /// Total gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    /// Each auxiliary loss, unweighted, token-weighted over the micro-batches like `loss`.
    pub aux: Vec<(String, f64)>,
    /// Which path ran the forward and backward.
    pub path: StepPath,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepPath {
    /// The fused CPU path (`engine`).
    Fused,
    /// candle's per-op autograd, with the reason the fused path did not run.
    Composed(String),
}

impl StepPath {
    pub fn name(&self) -> &'static str {
        match self {
            StepPath::Fused => "fused",
            StepPath::Composed(_) => "composed",
        }
    }
}

/// How a step runs. The default is what `train_step` does.
pub struct StepOptions<'a> {
    pub max_grad_norm: Option<f64>,
    /// Take the fused path when the model allows it (else always the composed one).
    pub fused: bool,
    /// Keep only each block's input and recompute the block in the backward (fused path;
    /// the composed path ignores it).
    pub gradient_checkpointing: bool,
    /// Sums token counts, losses and gradients over data-parallel workers.
    pub reducer: Option<&'a mut dyn GradReducer>,
    /// Seeds the dropout masks (the model spec's `dropout`), with the optimizer's step count
    /// and the micro-batch index (see ops/dropout.rs).
    pub dropout_seed: u64,
    /// Per micro-batch, the global index of this worker's first row (data-parallel workers
    /// each hold a slice of the rows), so the masks are one process's; empty means 0.
    pub first_rows: &'a [u64],
}

impl Default for StepOptions<'_> {
    fn default() -> Self {
        Self {
            max_grad_norm: None,
            fused: true,
            gradient_checkpointing: false,
            reducer: None,
            dropout_seed: 0,
            first_rows: &[],
        }
    }
}

/// The main loss and the auxiliary losses of one batch.
pub struct LossParts {
    /// Mean cross-entropy over the label tokens (a tracked scalar when training).
    pub main: Tensor,
    /// (name, weight, unweighted value) per auxiliary loss.
    pub aux: Vec<(String, f64, Tensor)>,
    pub tokens: usize,
}

impl LossParts {
    /// What the backward pass differentiates: main + sum of weight x aux. Zero-weight terms are
    /// left out of the graph, so they change nothing, not even the rounding.
    pub fn objective(&self) -> Result<Tensor> {
        let mut total = self.main.clone();
        for (_, w, v) in &self.aux {
            if *w != 0.0 {
                total = (total + v.affine(*w, 0.0)?)?;
            }
        }
        Ok(total)
    }
}

impl Decoder {
    /// What a training step updates, by name: the adapter matrices when an adapter is attached
    /// (the base stays frozen), else every parameter. Reads the model; changes nothing.
    pub fn trainable_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        if !self.has_adapter() && self.is_quantized() {
            return Err(Error::Input(
                "a quantized model cannot be trained in full: attach a LoRA adapter (the base \
                 stays quantized) or dequantize the model first"
                    .into(),
            ));
        }
        Ok(if self.has_adapter() {
            self.adapter_tensors()
        } else {
            self.named_parameters()
        })
    }

    /// The variables a step trains (see [`Decoder::trainable_tensors`]), made once and kept.
    /// The model itself holds untracked views of their storage, so a forward outside a step
    /// records no graph and needs no copy of the model, while the optimizer's in-place updates
    /// are what the model reads. A tensor replaced since (a merge, a load, quantization) gets a
    /// fresh variable with its current value.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let wanted = self.trainable_tensors()?;
        let current = wanted.len() == self.trainable.len()
            && wanted
                .iter()
                .zip(&self.trainable)
                .all(|((n, t), (m, v))| n == m && ops::shares_storage(t, v.as_tensor()));
        if !current {
            self.trainable = wanted
                .iter()
                .map(|(n, t)| Ok((n.clone(), Var::from_tensor(&t.detach())?)))
                .collect::<candle_core::Result<_>>()?;
            let views: HashMap<String, Tensor> = self
                .trainable
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                .collect();
            self.replace_tensors(&views);
        }
        Ok(self.trainable.clone())
    }

    /// The model with `vars` in place of the tensors they are named for: the view the composed
    /// step differentiates (it shares every weight with the model).
    pub fn tracked(&self, vars: &[(String, Var)]) -> Decoder {
        let mut view = self.clone();
        let vars: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        view.replace_tensors(&vars);
        view
    }

    fn replace_tensors(&mut self, by_name: &HashMap<String, Tensor>) {
        let mut put = |name: &str, t: &mut Tensor| {
            if let Some(new) = by_name.get(name) {
                *t = new.clone();
            }
        };
        self.visit_mut(&mut put);
        self.visit_adapter_mut(&mut put);
    }

    /// A view of the model that records no autograd graph (shares every weight).
    pub fn detached(&self) -> Decoder {
        let mut m = self.clone();
        m.visit_mut(&mut |_, t| *t = t.detach());
        m.visit_adapter_mut(&mut |_, t| *t = t.detach());
        m
    }

    /// Mean cross-entropy of the next-token predictions over every label token of `batch`,
    /// as a tracked scalar when the model holds variables.
    pub fn loss(&self, batch: &Batch) -> Result<(Tensor, usize)> {
        let parts = self.loss_parts(batch)?;
        Ok((parts.main, parts.tokens))
    }

    /// The LM head's weight when the loss may take the fused head + cross-entropy op: a plain
    /// float head, not on Metal (the op has no Metal forward), and no hook or aux loss that
    /// needs the logits themselves.
    fn fused_head_weight(&self) -> Option<&Tensor> {
        if self.hooks.needs_logits() || self.device.is_metal() {
            return None;
        }
        match &self.lm_head {
            Some(l) if l.bias.is_none() && l.lora.as_ref().is_none_or(|a| a.merged) => {
                l.weight.float()
            }
            Some(_) => None,
            None => self.embed.weight.float(),
        }
    }

    /// The main loss and every auxiliary loss the hooks ask for.
    pub fn loss_parts(&self, batch: &Batch) -> Result<LossParts> {
        self.loss_parts_with(batch, None)
    }

    /// [`Decoder::loss_parts`] with this micro-batch's dropout masks.
    pub fn loss_parts_with(&self, batch: &Batch, dropout: Option<Dropout>) -> Result<LossParts> {
        let labels = batch.shifted_labels()?;
        let n = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        let opts = ForwardOptions {
            attention_mask: batch.attention_mask.as_deref(),
            dropout,
            ..Default::default()
        };
        let losses = self.hooks.aux_losses();
        self.hooks.set_collecting(!losses.is_empty());
        let out = self.forward_hidden(&batch.ids, &opts, None);
        // Gathering ends with the forward, whether or not it succeeded.
        let collected = self.hooks.take_collected();
        self.hooks.set_collecting(false);
        let out = out?;
        let (b, t, h) = out.last_hidden.dims3()?;
        let hidden = out.last_hidden.reshape((b * t, h))?;
        let (main, flat) = match self.fused_head_weight() {
            Some(w) => (ops::lm_head_cross_entropy(&hidden, w, &labels)?, None),
            None => {
                let flat = self.logits(&hidden)?;
                (ops::cross_entropy(&flat, &labels)?, Some(flat))
            }
        };
        let mut aux = vec![];
        if !losses.is_empty() {
            // Only the z-loss reads logits, and it turns the fused head off (needs_logits).
            let label_logits = match &flat {
                Some(f) => {
                    let rows: Vec<u32> = (0..labels.len() as u32)
                        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
                        .collect();
                    Some(f.index_select(&Tensor::new(rows, f.device())?, 0)?)
                }
                None => None,
            };
            for (id, loss) in losses {
                let values: Vec<Tensor> = collected
                    .iter()
                    .filter(|(i, _)| i == id)
                    .map(|(_, t)| t.clone())
                    .collect();
                aux.push((
                    loss.name(),
                    loss.weight(),
                    loss.value(&values, label_logits.as_ref())?,
                ));
            }
        }
        Ok(LossParts {
            main,
            aux,
            tokens: n,
        })
    }

    /// Token-weighted mean loss over batches, without gradients.
    /// Under QAT, the loss of the rounded weights: what the quantized model will score.
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let (sum, count) = self.eval_loss_sum(batches)?;
        if count == 0 {
            return Err(Error::Input(
                "no label tokens to evaluate (all labels are -100)".into(),
            ));
        }
        Ok(sum / count as f64)
    }

    /// The summed loss over every label token of `batches`, and how many there were: what
    /// data-parallel workers add up before they divide.
    pub fn eval_loss_sum(&self, batches: &[Batch]) -> Result<(f64, usize)> {
        // A view, since rounding the weights for QAT replaces them for the call's duration.
        self.detached().with_fake_quant(|model| {
            let (mut sum, mut count) = (0.0, 0usize);
            for b in batches {
                let (loss, n) = model.loss(b)?;
                sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
                count += n;
            }
            Ok((sum, count))
        })
    }
}

/// Runs one optimizer step over `micro_batches` (gradient accumulation).
pub fn train_step(
    model: &mut Decoder,
    opt: &mut Optimizer,
    micro_batches: &[Batch],
    max_grad_norm: Option<f64>,
) -> Result<StepStats> {
    train_step_with(
        model,
        opt,
        micro_batches,
        StepOptions {
            max_grad_norm,
            ..Default::default()
        },
    )
}

/// One optimizer step, on the fused path when `opts.fused` and the model allow it.
pub fn train_step_with(
    model: &mut Decoder,
    opt: &mut Optimizer,
    micro_batches: &[Batch],
    mut opts: StepOptions,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(Error::Input(
            "a training step needs at least one batch".into(),
        ));
    }
    let vars = model.make_trainable()?;
    let mut local = 0usize;
    for b in micro_batches {
        local += b
            .shifted_labels()?
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
    }
    let mut total = [local as f64];
    if let Some(r) = opts.reducer.as_deref_mut() {
        r.sum_f64(&mut total)?;
    }
    let total = total[0] as usize;
    if total == 0 {
        return Err(Error::Input(
            "no label tokens to train on (all labels are -100)".into(),
        ));
    }
    let same_shape = micro_batches
        .iter()
        .all(|b| b.ids.dims() == micro_batches[0].ids.dims());
    let path = match crate::engine::ineligible(model) {
        _ if !opts.fused => StepPath::Composed("the fused path is turned off".into()),
        _ if !same_shape => StepPath::Composed("the micro-batches differ in shape".into()),
        Some(reason) => StepPath::Composed(reason),
        None => StepPath::Fused,
    };
    model.hooks.set_step(opt.step_count());
    let masks = Masks {
        p: model.spec.dropout,
        seed: opts.dropout_seed,
        step: opt.step_count(),
        first_rows: opts.first_rows,
    };
    // The fused path's gradients stay in its flat buffer, already clipped, with their norm.
    if path == StepPath::Fused {
        let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
        let a = model.with_fake_quant(|m| {
            crate::engine::accumulate(m, &names, micro_batches, total, masks, opts)
        })?;
        let grads = crate::engine::gradients(model)
            .ok_or_else(|| Error::Msg("the fused step kept no gradients".into()))?;
        opt.step_with(&vars, &grads)?;
        return Ok(StepStats {
            loss: a.loss,
            grad_norm: a.grad_norm,
            tokens: total,
            aux: vec![],
            path,
        });
    }
    let mut tracked = model.tracked(&vars);
    tracked.set_training(true);
    let (mut loss, mut aux, mut grads) =
        tracked.with_fake_quant(|m| accumulate(m, &vars, micro_batches, total, masks))?;
    if let Some(r) = opts.reducer {
        (loss, aux) = sum_over_workers(r, model, &vars, loss, aux, &mut grads)?;
    }
    let grad_norm = clip_composed(model, &vars, &mut grads, opts.max_grad_norm)?;
    opt.step(&vars, &grads)?;
    Ok(StepStats {
        loss,
        grad_norm,
        tokens: total,
        aux,
        path,
    })
}

/// Gradient transforms (hooks), then torch's clip_grad_norm_ on the composed path's gradients;
/// returns the norm before clipping.
fn clip_composed(
    model: &mut Decoder,
    vars: &[(String, Var)],
    grads: &mut HashMap<String, Tensor>,
    max_grad_norm: Option<f64>,
) -> Result<f64> {
    if !model.hooks.update_transforms().is_empty() {
        let params: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        model.hooks.transform_grads(&params, grads)?;
    }

    // torch's clip_grad_norm_: total = ||all grads||, coef = min(1, max/(total + 1e-6)).
    // Summed in the parameters' order (not the map's), so the same gradients always give the
    // same norm to the last bit and clipping never depends on hashing.
    let mut sq = 0f64;
    for g in vars.iter().filter_map(|(name, _)| grads.get(name)) {
        sq += crate::ops::sum_sq(g)?;
    }
    let grad_norm = sq.sqrt();
    if let Some(max) = max_grad_norm {
        let coef = (max as f32 / (grad_norm as f32 + 1e-6)).min(1.0);
        if coef < 1.0 {
            for g in grads.values_mut() {
                *g = g.affine(coef as f64, 0.0)?;
            }
        }
    }
    Ok(grad_norm)
}

/// Sums the workers' gradients in one flat f32 buffer (the parameters' order, then one presence
/// flag per parameter, so a parameter no worker's batches reached stays without a gradient, as
/// in one process), then the loss and the auxiliary losses.
fn sum_over_workers(
    r: &mut dyn GradReducer,
    model: &Decoder,
    vars: &[(String, Var)],
    loss: f64,
    aux: Vec<(String, f64)>,
    grads: &mut HashMap<String, Tensor>,
) -> Result<(f64, Vec<(String, f64)>)> {
    let numel: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut flat = Vec::with_capacity(numel + vars.len());
    for (name, v) in vars {
        match grads.get(name) {
            Some(g) => flat.extend(
                g.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            None => flat.resize(flat.len() + v.elem_count(), 0.0),
        }
    }
    flat.extend(vars.iter().map(|(n, _)| grads.contains_key(n) as u8 as f32));
    r.sum_f32(&mut flat)?;
    let (values, present) = flat.split_at(numel);
    let mut offset = 0;
    for ((name, v), &seen) in vars.iter().zip(present) {
        let n = v.elem_count();
        if seen > 0.0 {
            let g = Tensor::from_slice(&values[offset..offset + n], v.shape(), v.device())?;
            grads.insert(name.clone(), g.to_dtype(v.dtype())?);
        }
        offset += n;
    }

    // A worker whose batches held no label token accumulated no aux entries: the hooks name them.
    let names: Vec<String> = model
        .hooks
        .aux_losses()
        .iter()
        .map(|(_, l)| l.name())
        .collect();
    let mut sums = vec![loss];
    sums.extend(
        names
            .iter()
            .enumerate()
            .map(|(i, _)| aux.get(i).map_or(0.0, |a| a.1)),
    );
    r.sum_f64(&mut sums)?;
    Ok((
        sums[0],
        names.into_iter().zip(sums[1..].iter().copied()).collect(),
    ))
}

type Accumulated = (f64, Vec<(String, f64)>, HashMap<String, Tensor>);

/// Where one step's dropout masks come from: rate, run seed, the optimizer's step count and
/// this worker's first row of each micro-batch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Masks<'a> {
    pub p: f64,
    pub seed: u64,
    pub step: u64,
    pub first_rows: &'a [u64],
}

impl Masks<'_> {
    /// The masks of micro-batch `micro`; `None` without dropout.
    pub fn of(&self, micro: usize) -> Option<Dropout> {
        let first_row = self.first_rows.get(micro).copied().unwrap_or(0);
        Dropout::new(self.p, self.seed, self.step, micro as u64, first_row)
    }
}

pub(crate) fn accumulate(
    model: &Decoder,
    vars: &[(String, Var)],
    micro_batches: &[Batch],
    total: usize,
    masks: Masks,
) -> Result<Accumulated> {
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss_sum = 0f64;
    let mut aux_sum: Vec<(String, f64)> = vec![];
    let scalar = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
    };
    for (micro, b) in micro_batches.iter().enumerate() {
        let parts = model.loss_parts_with(b, masks.of(micro))?;
        let n = parts.tokens;
        if n == 0 {
            continue;
        }
        let share = n as f64 / total as f64;
        loss_sum += scalar(&parts.main.affine(share, 0.0)?)?;
        for (i, (name, _, v)) in parts.aux.iter().enumerate() {
            let v = scalar(v)? * share;
            match aux_sum.get_mut(i) {
                Some((_, acc)) => *acc += v,
                None => aux_sum.push((name.clone(), v)),
            }
        }
        let weighted = parts.objective()?.affine(share, 0.0)?;
        let store = weighted.backward()?;
        for (name, var) in vars {
            if let Some(g) = store.get(var) {
                let g = match grads.remove(name) {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                };
                grads.insert(name.clone(), g);
            }
        }
    }
    Ok((loss_sum, aux_sum, grads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn batch(ids: &[u32], labels: Vec<i64>, pre_shifted: bool) -> Batch {
        Batch {
            ids: Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap(),
            labels,
            attention_mask: None,
            pre_shifted,
        }
    }

    #[test]
    fn pre_shifted_targets_are_the_shifted_labels_plus_the_last_position() {
        let m = crate::testing::tiny_llama(3);
        let w: Vec<u32> = vec![4, 9, 17, 2, 33, 8, 21];
        let (x, y) = (&w[..6], &w[1..]);
        let as_labels = |v: &[u32]| v.iter().map(|&i| i as i64).collect::<Vec<_>>();
        // The last target ignored: the same loss as the unshifted labels of x.
        let mut cut = as_labels(y);
        cut[5] = IGNORE_INDEX;
        let unshifted = m.eval_loss(&[batch(x, as_labels(x), false)]).unwrap();
        let shifted = m.eval_loss(&[batch(x, cut, true)]).unwrap();
        assert!((unshifted - shifted).abs() < 1e-12, "{unshifted} {shifted}");
        // With it: the mean over all six positions, by the closed form from the logits.
        let all = m.eval_loss(&[batch(x, as_labels(y), true)]).unwrap();
        let (logits, _) = m
            .detached()
            .forward(
                &batch(x, vec![], false).ids,
                &ForwardOptions::default(),
                None,
            )
            .unwrap();
        let rows = logits.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let want: f64 = rows
            .iter()
            .zip(y)
            .map(|(r, &t)| {
                let max = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
                let lse = max + r.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                lse - r[t as usize] as f64
            })
            .sum::<f64>()
            / 6.0;
        assert!((all - want).abs() < 1e-5, "{all} {want}");
    }
}

#[cfg(test)]
#[path = "train_reduce_tests.rs"]
mod reduce_tests;

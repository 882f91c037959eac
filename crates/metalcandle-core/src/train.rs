//! One optimisation step: forward, loss, backward over micro-batches (gradients summed,
//! each micro-batch weighted by its share of the label tokens), global-norm clipping as torch
//! does it, and the optimizer update.

use crate::error::{Error, Result};
use crate::model::{Decoder, ForwardOptions};
use crate::ops::{self, cross_entropy::IGNORE_INDEX};
use crate::optim::Optimizer;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

pub struct Batch {
    /// u32 [B, T]
    pub ids: Tensor,
    /// [B*T], unshifted (Hugging Face convention: position t predicts labels[t+1]).
    pub labels: Vec<i64>,
    /// [B*T], 1 = token, 0 = padding.
    pub attention_mask: Option<Vec<i64>>,
}

impl Batch {
    /// Labels moved one step left within each row, the last position ignored.
    fn shifted_labels(&self) -> Result<Vec<i64>> {
        let (b, t) = self.ids.dims2()?;
        if self.labels.len() != b * t {
            return Err(Error::Input(format!(
                "labels have {} entries, input_ids {b} x {t}",
                self.labels.len()
            )));
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
    /// The parameters a step trains: the adapter matrices when an adapter is attached (the
    /// base stays untracked, so no gradient is ever computed for it), else every parameter.
    /// Turns them into variables in place, once; later calls return the same variables.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = vec![];
        let mut err = None;
        let mut to_var = |name: &str, t: &mut Tensor| match Var::from_tensor(t) {
            Ok(v) => {
                *t = v.as_tensor().clone();
                vars.push((name.to_string(), v));
            }
            Err(e) => err = Some(e),
        };
        if !self.has_adapter() && self.is_quantized() {
            return Err(Error::Input(
                "a quantized model cannot be trained in full: attach a LoRA adapter (the base \
                 stays quantized) or dequantize the model first"
                    .into(),
            ));
        }
        if self.has_adapter() {
            self.visit_mut(&mut |_, t| *t = t.detach());
            self.visit_adapter_mut(&mut to_var);
        } else {
            self.visit_mut(&mut to_var);
        }
        match err {
            Some(e) => Err(e.into()),
            None => Ok(vars),
        }
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
        let labels = batch.shifted_labels()?;
        let n = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        let opts = ForwardOptions {
            attention_mask: batch.attention_mask.as_deref(),
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
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let model = self.detached();
        let (mut sum, mut count) = (0.0, 0usize);
        for b in batches {
            let (loss, n) = model.loss(b)?;
            sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * n as f64;
            count += n;
        }
        if count == 0 {
            return Err(Error::Input(
                "no label tokens to evaluate (all labels are -100)".into(),
            ));
        }
        Ok(sum / count as f64)
    }
}

/// Runs one optimizer step over `micro_batches` (gradient accumulation).
pub fn train_step(
    model: &mut Decoder,
    opt: &mut Optimizer,
    micro_batches: &[Batch],
    max_grad_norm: Option<f64>,
) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(Error::Input(
            "a training step needs at least one batch".into(),
        ));
    }
    let vars = model.make_trainable()?;
    let mut total = 0usize;
    for b in micro_batches {
        total += b
            .shifted_labels()?
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
    }
    if total == 0 {
        return Err(Error::Input(
            "no label tokens to train on (all labels are -100)".into(),
        ));
    }
    model.hooks.set_step(opt.step_count());
    model.set_training(true);
    let result = accumulate(model, &vars, micro_batches, total);
    model.set_training(false);
    let (loss, aux, mut grads) = result?;
    if !model.hooks.update_transforms().is_empty() {
        let params: HashMap<String, Tensor> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        model.hooks.transform_grads(&params, &mut grads)?;
    }

    // torch's clip_grad_norm_: total = ||all grads||, coef = min(1, max/(total + 1e-6)).
    // Summed in the parameters' order (not the map's), so the same gradients always give the
    // same norm to the last bit and clipping never depends on hashing.
    let mut sq = 0f64;
    for g in vars.iter().filter_map(|(name, _)| grads.get(name)) {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
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
    opt.step(&vars, &grads)?;
    Ok(StepStats {
        loss,
        grad_norm,
        tokens: total,
        aux,
    })
}

type Accumulated = (f64, Vec<(String, f64)>, HashMap<String, Tensor>);

fn accumulate(
    model: &Decoder,
    vars: &[(String, Var)],
    micro_batches: &[Batch],
    total: usize,
) -> Result<Accumulated> {
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss_sum = 0f64;
    let mut aux_sum: Vec<(String, f64)> = vec![];
    let scalar = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
    };
    for b in micro_batches {
        let parts = model.loss_parts(b)?;
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

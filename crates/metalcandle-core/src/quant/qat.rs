//! Quantization-aware training. While a step runs forward and backward, every selected matrix
//! holds the values its block format will hold (quantize, then dequantize: candle's own
//! rounding, the one `Decoder::quantize` applies afterwards); the gradient taken at those
//! rounded values then updates the float weights as if the rounding were the identity (the
//! straight-through estimator). The float weights are put back, bit for bit, before the
//! optimizer reads them, so checkpoints, merges and the final quantization see the trained
//! float weights.
//!
//! With a LoRA adapter the matrix that gets quantized is the merged one, W + s B A: the frozen
//! base is replaced for the step by Q(W + s B A) - s B A, so the layer computes x Q(W + s B A)^T
//! and the adapter's gradient is the straight-through one of the merged weight.

use super::{quantize_matrix, select, QuantReport};
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::nn::{Linear, Weight};
use candle_core::quantized::GgmlDType;
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, HashMap};

/// The matrices rounded during training, by module name, with their format.
#[derive(Debug, Clone, Default)]
pub struct Qat {
    pub formats: BTreeMap<String, GgmlDType>,
}

/// The values `dtype` stores for `t`, in `t`'s dtype and device.
pub fn fake_quantize(t: &Tensor, dtype: GgmlDType) -> Result<Tensor> {
    let q = quantize_matrix(t, dtype)?;
    Ok(q.dequantize(t.device())?.to_dtype(t.dtype())?)
}

/// How to undo one matrix's rounding after the step.
enum Saved {
    /// A trained weight, rounded in place: its float values.
    Var(Var, Tensor),
    /// A frozen weight, swapped for a rounded tensor: the original tensor.
    Frozen(String, Tensor),
}

impl Decoder {
    /// Turns QAT on for the matrices `choose` gives a format (module names as in
    /// `Decoder::quantize`); shapes a format cannot take stay float and are reported.
    pub fn set_qat(&mut self, choose: &dyn Fn(&str) -> Option<GgmlDType>) -> Result<QuantReport> {
        let mut report = QuantReport::default();
        let mut formats = BTreeMap::new();
        for (name, w) in self.quantizable_mut() {
            let Weight::Float(t) = &*w else {
                return Err(Error::Input(format!(
                    "{name} is already quantized: quantization-aware training starts from the \
                     float model (dequantize it first)"
                )));
            };
            if let Some(dtype) = select(&name, t, choose, &mut report) {
                formats.insert(name, dtype);
            }
        }
        self.qat = (!formats.is_empty()).then_some(Qat { formats });
        Ok(report)
    }

    /// Runs `f` with every QAT matrix rounded to its format, then restores the float weights
    /// (also when `f` fails). Without QAT it is `f(self)`.
    pub fn with_fake_quant<R>(&mut self, f: impl FnOnce(&mut Decoder) -> Result<R>) -> Result<R> {
        let Some(qat) = self.qat.clone() else {
            return f(self);
        };
        let mut saved = vec![];
        let out = self.round_for_qat(&qat, &mut saved).and_then(|_| f(self));
        // Restores what was rounded even when rounding a later matrix failed.
        let restored = self.restore_after_qat(saved);
        let out = out?;
        restored?;
        Ok(out)
    }

    fn round_for_qat(&mut self, qat: &Qat, saved: &mut Vec<Saved>) -> Result<()> {
        // The adapter's update in weight space, for the merged weight that gets quantized.
        let mut deltas: HashMap<String, Tensor> = HashMap::new();
        let mut add_delta = |l: &Linear| -> Result<()> {
            if let Some(lora) = l.lora.as_ref().filter(|a| !a.merged) {
                if qat.formats.contains_key(&l.name) {
                    deltas.insert(l.name.clone(), lora.delta()?.detach());
                }
            }
            Ok(())
        };
        for l in self.linears() {
            add_delta(l)?;
        }
        if let Some(head) = &self.lm_head {
            add_delta(head)?;
        }
        for (name, w) in self.quantizable_mut() {
            let Some(&dtype) = qat.formats.get(&name) else {
                continue;
            };
            let Some(t) = w.float() else {
                return Err(Error::Input(format!(
                    "{name} was quantized while quantization-aware training was on"
                )));
            };
            let t = t.clone();
            match deltas.get(&name) {
                Some(delta) => {
                    let rounded = fake_quantize(&(t.detach() + delta)?, dtype)?;
                    *w = Weight::Float((rounded - delta)?);
                    saved.push(Saved::Frozen(name, t));
                }
                None if t.is_variable() => {
                    let var = Var::from_tensor(&t)?;
                    let float = t.copy()?;
                    var.set(&fake_quantize(&float, dtype)?)?;
                    saved.push(Saved::Var(var, float));
                }
                None => {
                    *w = Weight::Float(fake_quantize(&t, dtype)?);
                    saved.push(Saved::Frozen(name, t));
                }
            }
        }
        Ok(())
    }

    fn restore_after_qat(&mut self, saved: Vec<Saved>) -> Result<()> {
        let mut frozen = HashMap::new();
        for s in saved {
            match s {
                Saved::Var(var, float) => var.set(&float)?,
                Saved::Frozen(name, t) => {
                    frozen.insert(name, t);
                }
            }
        }
        if !frozen.is_empty() {
            for (name, w) in self.quantizable_mut() {
                if let Some(t) = frozen.remove(&name) {
                    *w = Weight::Float(t);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Algorithm, Optimizer, OptimizerConfig};
    use crate::testing::{lm_batch, quantizable_llama};
    use crate::train::{train_step_with, Batch, StepOptions, StepPath};

    fn batch() -> Batch {
        lm_batch((0..24).map(|i| (i * 37 + 5) % 64).collect(), 2)
    }

    fn sgd(lr: f64) -> Optimizer {
        Optimizer::new(OptimizerConfig {
            algorithm: Algorithm::Sgd {
                momentum: 0.0,
                nesterov: false,
            },
            lr,
            weight_decay: 0.0,
            ..Default::default()
        })
        .unwrap()
    }

    fn q4_0(_: &str) -> Option<GgmlDType> {
        Some(GgmlDType::Q4_0)
    }

    /// The model as `quantize` then `dequantize` leave it: the reference for the rounded values.
    fn rounded_copy(m: &Decoder) -> Decoder {
        let mut r = m.detached();
        r.quantize(&q4_0).unwrap();
        r.dequantize().unwrap();
        r
    }

    fn weights(m: &Decoder) -> Vec<(String, Vec<f32>)> {
        m.matrices()
            .into_iter()
            .map(|(n, w)| {
                let v = w.to_float().unwrap().flatten_all().unwrap();
                (n, v.to_vec1().unwrap())
            })
            .collect()
    }

    fn step(m: &mut Decoder, lr: f64, fused: bool) -> crate::train::StepStats {
        let opts = StepOptions {
            fused,
            ..Default::default()
        };
        train_step_with(m, &mut sgd(lr), &[batch()], opts).unwrap()
    }

    #[test]
    fn a_qat_step_is_the_rounded_models_gradient_applied_to_the_float_weights() {
        let lr = 0.1;
        for fused in [true, false] {
            let mut m = quantizable_llama(false, 0);
            let report = m.set_qat(&q4_0).unwrap();
            assert_eq!(report.quantized.len(), 1 + 2 * 7 + 1);
            let before = weights(&m);
            let mut r = rounded_copy(&m);
            let r_before = weights(&r);
            let qat = step(&mut m, lr, fused);
            let reference = step(&mut r, lr, fused);
            assert_eq!(qat.path == StepPath::Fused, fused, "{:?}", qat.path);
            // The same loss and gradient as the rounded model: its forward and backward ran.
            assert!((qat.loss - reference.loss).abs() < 1e-6 * reference.loss);
            assert!((qat.grad_norm - reference.grad_norm).abs() < 1e-5 * reference.grad_norm);
            // Straight through: the float weights moved by exactly the rounded model's step.
            let (after, r_after) = (weights(&m), weights(&r));
            let mut moved = 0f32;
            for (((name, w0), (_, w1)), ((_, r0), (_, r1))) in
                before.iter().zip(&after).zip(r_before.iter().zip(&r_after))
            {
                for i in 0..w0.len() {
                    let (d, dr) = (w1[i] - w0[i], r1[i] - r0[i]);
                    assert!((d - dr).abs() < 1e-6, "{name}[{i}]: {d} vs {dr}");
                    moved = moved.max(d.abs());
                }
                // The float weights are kept, not the rounded ones.
                assert_ne!(w1, r1, "{name}");
            }
            assert!(moved > 1e-3, "the step moved nothing ({moved})");
        }
    }

    #[test]
    fn qat_evaluates_the_rounded_weights_and_quantizing_ends_it() {
        let mut m = quantizable_llama(false, 0);
        let float = m.eval_loss(&[batch()]).unwrap();
        m.set_qat(&q4_0).unwrap();
        let qat = m.eval_loss(&[batch()]).unwrap();
        let ptq = rounded_copy(&m).eval_loss(&[batch()]).unwrap();
        assert_eq!(qat, ptq);
        assert_ne!(qat, float);
        // Evaluating left the float weights in place.
        let mut plain = m.clone();
        plain.qat = None;
        assert_eq!(plain.eval_loss(&[batch()]).unwrap(), float);

        m.quantize(&q4_0).unwrap();
        assert!(m.qat.is_none());
        let e = m.set_qat(&q4_0).unwrap_err().to_string();
        assert!(e.contains("already quantized"), "{e}");
    }

    #[test]
    fn qat_with_lora_rounds_the_merged_weight_and_keeps_the_base() {
        for fused in [true, false] {
            let mut m = quantizable_llama(false, 0);
            m.add_lora(crate::testing::all_linear_lora(4, 8.0), 1)
                .unwrap();
            // B starts at zero: give the adapters an update for the merge to carry.
            m.visit_adapter_mut(&mut |name, t| {
                if name.contains("lora_B") {
                    *t = (t.ones_like().unwrap() * 0.05).unwrap();
                }
            });
            m.set_qat(&q4_0).unwrap();
            let mut merged = m.detached();
            merged.merge_adapter().unwrap();
            merged.remove_adapter();
            let reference = rounded_copy(&merged).eval_loss(&[batch()]).unwrap();
            assert!((m.eval_loss(&[batch()]).unwrap() - reference).abs() < 1e-5 * reference);

            let base = weights(&m);
            let stats = step(&mut m, 0.1, fused);
            assert_eq!(stats.path == StepPath::Fused, fused, "{:?}", stats.path);
            assert!((stats.loss - reference).abs() < 1e-5 * reference);
            assert_eq!(weights(&m), base, "the frozen base changed");
            let mut adapters_moved = false;
            m.visit_adapter_mut(&mut |name, t| {
                if name.contains("lora_B") {
                    let d = (t.clone() - 0.05).unwrap().abs().unwrap();
                    adapters_moved |= d.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0;
                }
            });
            assert!(adapters_moved);
        }
    }
}

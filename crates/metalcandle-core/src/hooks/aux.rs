//! Auxiliary losses, each weighted and reported apart from the main loss.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone)]
pub enum AuxLoss {
    /// mean(x^2) at the matching points (averaged over them).
    ActivationL2 { point: String, weight: f64 },
    /// mean over label positions of logsumexp(logits)^2 (PaLM's z-loss).
    ZLoss { weight: f64 },
    /// Mean entropy (nats) of the attention rows at matching `attn_probs` points.
    AttentionEntropy { point: String, weight: f64 },
}

impl AuxLoss {
    pub fn name(&self) -> String {
        match self {
            AuxLoss::ActivationL2 { point, .. } => format!("activation_l2[{point}]"),
            AuxLoss::ZLoss { .. } => "z_loss".into(),
            AuxLoss::AttentionEntropy { point, .. } => format!("attention_entropy[{point}]"),
        }
    }

    pub fn weight(&self) -> f64 {
        match self {
            AuxLoss::ActivationL2 { weight, .. }
            | AuxLoss::ZLoss { weight }
            | AuxLoss::AttentionEntropy { weight, .. } => *weight,
        }
    }

    /// The point pattern whose values the loss needs, if any.
    pub fn point(&self) -> Option<&str> {
        match self {
            AuxLoss::ActivationL2 { point, .. } | AuxLoss::AttentionEntropy { point, .. } => {
                Some(point)
            }
            AuxLoss::ZLoss { .. } => None,
        }
    }

    /// The unweighted loss from the values collected at its points, or from the logits
    /// [N, V] of the label positions.
    pub fn value(&self, values: &[Tensor], label_logits: Option<&Tensor>) -> Result<Tensor> {
        let mean_over = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<Tensor> {
            if values.is_empty() {
                return Err(Error::Input(format!(
                    "aux loss {}: its point was not reached in the forward",
                    self.name()
                )));
            }
            let mut acc = f(&values[0])?;
            for v in &values[1..] {
                acc = (acc + f(v)?)?;
            }
            Ok(acc.affine(1.0 / values.len() as f64, 0.0)?)
        };
        match self {
            AuxLoss::ActivationL2 { .. } => mean_over(&|x| Ok(x.sqr()?.mean_all()?)),
            AuxLoss::AttentionEntropy { .. } => mean_over(&|p| {
                if p.rank() != 4 {
                    return Err(Error::Input(format!(
                        "aux loss {}: needs attn_probs points, got a value of shape {:?}",
                        self.name(),
                        p.dims()
                    )));
                }
                // Masked keys have probability 0: clamp before the log so 0 * log 0 is 0.
                let plogp = (p * p.clamp(1e-30, 1.0)?.log()?)?;
                Ok(plogp.sum(D::Minus1)?.neg()?.mean_all()?)
            }),
            AuxLoss::ZLoss { .. } => {
                let logits = label_logits
                    .ok_or_else(|| Error::Msg("z-loss: the logits were not materialized".into()))?;
                let z = logits.to_dtype(DType::F32)?.log_sum_exp(D::Minus1)?;
                Ok(z.sqr()?.mean_all()?)
            }
        }
    }
}

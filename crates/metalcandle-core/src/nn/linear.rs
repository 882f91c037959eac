//! A linear layer `y = x W^T + b`, W [out, in]. The weight goes through the frozen-weight
//! (or quantized) kernel unless it is itself trainable.

use super::Weight;
use crate::lora::Lora;
use crate::ops;
use crate::quant::calibrate::Observer;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path as in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
    /// Training mode: LoRA dropout applies.
    pub training: bool,
    /// Set while calibrating for quantization: records the inputs.
    pub observer: Option<Observer>,
}

impl Linear {
    /// A plain layer: no adapter, no observer, inference mode. (GPT-2's Conv1D layout is the
    /// checkpoint's business: `weights` transposes it on reading and writing.)
    pub fn new(name: String, weight: Weight, bias: Option<Tensor>) -> Self {
        Self {
            name,
            weight,
            bias,
            lora: None,
            training: false,
            observer: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(o) = &self.observer {
            o.lock()
                .unwrap()
                .record(x)
                .map_err(candle_core::Error::from)?;
        }
        if let Some(l) = &self.lora {
            let no_dropout = !self.training || l.dropout == 0.0;
            if !l.merged && no_dropout && ops::use_cpu_kernel(x) {
                return ops::lora_linear(
                    x,
                    &self.weight,
                    self.bias.as_ref(),
                    &l.a,
                    &l.b,
                    l.scaling,
                );
            }
        }
        let mut y = self.weight.linear(x)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        match &self.lora {
            Some(l) if !l.merged => y + l.forward(x, self.training)?,
            _ => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn affine_map_matches_closed_form() {
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -1., 0.], &Device::Cpu).unwrap();
        let lin = Linear::new("l".into(), Weight::Float(w), Some(b));
        let y = lin
            .forward(&Tensor::new(&[[[1f32, -1.]]], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            y.to_vec3::<f32>().unwrap(),
            vec![vec![vec![-0.5, -2., -1.]]]
        );
    }
}

//! A linear layer `y = x W^T + b`, W [out, in]. The weight goes through the frozen-weight
//! kernel unless it is itself trainable.

use crate::lora::Lora;
use crate::ops;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    /// Module path as in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// The checkpoint stores the weight as [in, out] (GPT-2's Conv1D).
    pub conv1d: bool,
    pub lora: Option<Lora>,
    /// Training mode: LoRA dropout applies.
    pub training: bool,
}

impl Linear {
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = ops::frozen_linear(x, &self.weight)?;
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
        let lin = Linear {
            name: "l".into(),
            weight: w,
            bias: Some(b),
            conv1d: false,
            lora: None,
            training: false,
        };
        let y = lin
            .forward(&Tensor::new(&[[[1f32, -1.]]], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            y.to_vec3::<f32>().unwrap(),
            vec![vec![vec![-0.5, -2., -1.]]]
        );
    }
}

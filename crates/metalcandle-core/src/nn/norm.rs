//! RMSNorm and LayerNorm over the last dimension.

use crate::ops;
use crate::spec::{NormKind, NormSpec};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Norm {
    /// Module path, e.g. `model.layers.0.input_layernorm`.
    pub name: String,
    pub spec: NormSpec,
    pub weight: Tensor,
    /// LayerNorm only.
    pub bias: Option<Tensor>,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (self.spec.kind, &self.bias) {
            (NormKind::RmsNorm, _) => ops::rms_norm(x, &self.weight, self.spec.eps),
            (NormKind::LayerNorm, Some(b)) => ops::layer_norm(x, &self.weight, b, self.spec.eps),
            (NormKind::LayerNorm, None) => {
                let zero = self.weight.zeros_like()?;
                ops::layer_norm(x, &self.weight, &zero, self.spec.eps)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_and_layer_norm_match_closed_forms() {
        let x = Tensor::new(&[[3f64, 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[1f64, 2.], &Device::Cpu).unwrap();
        let norm = |kind, bias| Norm {
            name: "n".into(),
            spec: NormSpec { kind, eps: 0.0 },
            weight: w.clone(),
            bias,
        };
        let rms = norm(NormKind::RmsNorm, None);
        // rms([3, 4]) = sqrt(12.5)
        let r = 12.5f64.sqrt();
        let y = rms.forward(&x).unwrap().to_vec2::<f64>().unwrap();
        assert!((y[0][0] - 3. / r).abs() < 1e-12 && (y[0][1] - 8. / r).abs() < 1e-12);
        let b = Tensor::new(&[0.5f64, 0.], &Device::Cpu).unwrap();
        let ln = norm(NormKind::LayerNorm, Some(b));
        // mean 3.5, std 0.5: normalized [-1, 1]
        let y = ln.forward(&x).unwrap().to_vec2::<f64>().unwrap();
        assert!((y[0][0] + 0.5).abs() < 1e-12 && (y[0][1] - 2.).abs() < 1e-12);
    }
}

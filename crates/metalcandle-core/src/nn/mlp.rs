//! Gated MLP `down(act(gate(x)) * up(x))` (SwiGLU with SiLU) and plain `down(act(up(x)))`.

use super::Linear;
use crate::ops;
use crate::spec::{Activation, MlpKind, MlpSpec};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Mlp {
    pub spec: MlpSpec,
    /// Gated MLPs only.
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match (self.spec.kind, &self.gate) {
            (MlpKind::Gated, Some(gate)) => {
                let (g, u) = (gate.forward(x)?, self.up.forward(x)?);
                if self.spec.activation == Activation::Silu {
                    ops::swiglu(&g, &u)?
                } else {
                    (ops::activation(&g, self.spec.activation)? * u)?
                }
            }
            _ => ops::activation(&self.up.forward(x)?, self.spec.activation)?,
        };
        self.down.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn lin(w: &[[f64; 1]; 1]) -> Linear {
        let w = crate::nn::Weight::Float(Tensor::new(w, &Device::Cpu).unwrap());
        Linear::new("l".into(), w, None)
    }

    #[test]
    fn swiglu_mlp_matches_closed_form() {
        let spec = MlpSpec {
            kind: MlpKind::Gated,
            intermediate_size: 1,
            activation: Activation::Silu,
            bias: false,
        };
        let mlp = Mlp {
            spec,
            gate: Some(lin(&[[2.0]])),
            up: lin(&[[3.0]]),
            down: lin(&[[0.5]]),
        };
        let x = 0.7f64;
        let y = mlp
            .forward(&Tensor::new(&[[x]], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()[0][0];
        let g = 2.0 * x;
        let expected = 0.5 * (g / (1.0 + (-g).exp())) * (3.0 * x);
        assert!((y - expected).abs() < 1e-12);
    }
}

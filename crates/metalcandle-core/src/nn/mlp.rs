//! Gated MLP `down(act(gate(x)) * up(x))` (SwiGLU with SiLU) and plain `down(act(up(x)))`.

use super::Linear;
use crate::ops;
use crate::spec::{Activation, MlpKind, MlpSpec};
use candle_core::{Result, Tensor, D};

#[derive(Debug, Clone)]
pub struct Mlp {
    pub spec: MlpSpec,
    /// Gated MLPs with separate projections only.
    pub gate: Option<Linear>,
    /// With `spec.fused_gate_up`, gate | up in one [2 * intermediate, hidden] projection: one
    /// linear keeps the checkpoint's tensor whole for loading, saving, LoRA and quantization.
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gated = |g: Tensor, u: Tensor| -> Result<Tensor> {
            if self.spec.activation == Activation::Silu {
                ops::swiglu(&g, &u)
            } else {
                ops::activation(&g, self.spec.activation)? * u
            }
        };
        let h = match (self.spec.kind, &self.gate) {
            (MlpKind::Gated, _) if self.spec.fused_gate_up => {
                let (y, ff) = (self.up.forward(x)?, self.spec.intermediate_size);
                gated(y.narrow(D::Minus1, 0, ff)?, y.narrow(D::Minus1, ff, ff)?)?
            }
            (MlpKind::Gated, Some(gate)) => gated(gate.forward(x)?, self.up.forward(x)?)?,
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
            fused_gate_up: false,
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

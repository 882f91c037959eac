//! Seeded initialisation for models trained from scratch: normal(0, std) linears and
//! embeddings (GPT-2's convention), zero biases, unit norm scales.

use super::names::{param_specs, Role};
use crate::error::Result;
use crate::rng::Rng;
use crate::spec::ModelSpec;
use candle_core::{Device, Tensor};
use std::collections::HashMap;

pub fn init_tensors(
    spec: &ModelSpec,
    seed: u64,
    std: f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    // A from-scratch config allocates all of its parameters at once: refuse what cannot fit first.
    crate::limits::check_model_size(spec, "config")?;
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for p in param_specs(spec) {
        let n: usize = p.shape.iter().product();
        let data: Vec<f32> = match p.role {
            Role::Embedding | Role::Weight => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
            Role::Bias | Role::NormBias => vec![0.0; n],
            Role::NormWeight => vec![1.0; n],
        };
        out.insert(p.name, Tensor::from_vec(data, p.shape.as_slice(), device)?);
    }
    Ok(out)
}

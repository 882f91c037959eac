//! Rotary embedding tables. Built in f32 as Hugging Face does (`inv_freq = 1/theta^(2i/d)`,
//! `freqs = pos * inv_freq`, then cos/sin), whatever the model's dtype.

use crate::spec::RopeScaling;
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RotaryTables {
    inv_freq: Vec<f32>,
}

impl RotaryTables {
    pub fn new(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, lo, hi) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old = *original_max_position_embeddings as f32;
                let (low_wavelen, high_wavelen) = (old / lo, old / hi);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self { inv_freq }
    }

    /// cos and sin at `positions` (row-major [b, t]), each [b, t, head_dim/2].
    pub fn cos_sin(
        &self,
        positions: &[i64],
        (b, t): (usize, usize),
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_follow_the_closed_form() {
        let t = RotaryTables::new(8, 10000.0, &RopeScaling::Default);
        let expected: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 4.0))
            .collect();
        assert_eq!(t.inv_freq, expected);
        let (c, s) = t
            .cos_sin(&[0, 5], (1, 2), DType::F32, &Device::Cpu)
            .unwrap();
        let (c, s) = (c.to_vec3::<f32>().unwrap(), s.to_vec3::<f32>().unwrap());
        assert_eq!(c[0][0], vec![1.0; 4]);
        assert_eq!(s[0][1][1], (5.0 * expected[1]).sin());
        let lin = RotaryTables::new(8, 10000.0, &RopeScaling::Linear { factor: 2.0 });
        assert_eq!(lin.inv_freq[1], expected[1] / 2.0);
    }
}

//! Token embeddings and positional embeddings (learned tables or fixed sinusoids).

use super::Weight;
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    /// [rows, hidden]
    pub weight: Weight,
}

impl Embedding {
    /// Looks up `ids` [B, T] (u32) into [B, T, hidden].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.rows(ids)
    }
}

/// The fixed sinusoidal table of "Attention Is All You Need" at the given positions:
/// pe[p, 2i] = sin(p / 10000^(2i/d)), pe[p, 2i+1] = cos(p / 10000^(2i/d)).
pub fn sinusoidal(
    positions: &[i64],
    shape: (usize, usize),
    hidden: usize,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let mut out = vec![0f32; positions.len() * hidden];
    for (k, &p) in positions.iter().enumerate() {
        for i in 0..hidden / 2 {
            let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / hidden as f64);
            let a = p as f64 * freq;
            out[k * hidden + 2 * i] = a.sin() as f32;
            out[k * hidden + 2 * i + 1] = a.cos() as f32;
        }
    }
    Tensor::from_vec(out, (shape.0, shape.1, hidden), dev)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_sinusoids() {
        let w = Tensor::new(&[[0f32, 1.], [2., 3.], [4., 5.]], &Device::Cpu).unwrap();
        let e = Embedding {
            name: "e".into(),
            weight: Weight::Float(w),
        };
        let y = e
            .forward(&Tensor::new(&[[2u32, 0]], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            y.to_vec3::<f32>().unwrap(),
            vec![vec![vec![4., 5.], vec![0., 1.]]]
        );
        let pe = sinusoidal(&[0, 3], (1, 2), 4, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        assert_eq!(pe[0][0], vec![0., 1., 0., 1.]);
        assert!(
            (pe[0][1][0] - 3f32.sin()).abs() < 1e-6 && (pe[0][1][3] - (0.03f32).cos()).abs() < 1e-6
        );
    }
}

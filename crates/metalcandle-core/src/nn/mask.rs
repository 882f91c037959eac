//! Additive attention masks: causal, sliding window and key padding in one [B, 1, T, K] tensor.

use candle_core::{DType, Device, Result, Tensor};

/// Masked scores get this instead of -inf, so a row with no visible key stays finite.
pub const MASK_VALUE: f32 = -3.0e38;

/// Query `i` of the new block (absolute index `past + i`) may see key `j` when `j <= past + i`,
/// `j > past + i - window` if a window is set, and `key_mask[b][j] != 0` if a key mask is given.
/// Indices count in sequence (cache) space, not position ids, as in Hugging Face.
pub fn attention_mask(
    b: usize,
    t: usize,
    past: usize,
    window: Option<usize>,
    key_mask: Option<&[i64]>,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let k = past + t;
    let mut m = vec![0f32; b * t * k];
    for bi in 0..b {
        for i in 0..t {
            let q = past + i;
            for j in 0..k {
                let causal = j <= q;
                let in_window = window.is_none_or(|w| j + w > q);
                let not_pad = key_mask.is_none_or(|km| km[bi * k + j] != 0);
                if !(causal && in_window && not_pad) {
                    m[(bi * t + i) * k + j] = MASK_VALUE;
                }
            }
        }
    }
    Tensor::from_vec(m, (b, 1, t, k), dev)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible(m: &Tensor) -> Vec<Vec<usize>> {
        let v = m.to_vec3::<f32>().unwrap().remove(0);
        v.iter()
            .map(|row| {
                row.iter()
                    .enumerate()
                    .filter(|(_, x)| **x == 0.0)
                    .map(|(j, _)| j)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn causal_window_and_padding() {
        let m = attention_mask(1, 4, 0, None, None, DType::F32, &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(
            visible(&m),
            vec![vec![0], vec![0, 1], vec![0, 1, 2], vec![0, 1, 2, 3]]
        );
        // A window of 2 counts the query itself.
        let m = attention_mask(1, 4, 0, Some(2), None, DType::F32, &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(
            visible(&m),
            vec![vec![0], vec![0, 1], vec![1, 2], vec![2, 3]]
        );
        // One new token after 3 cached ones, the first of which is padding.
        let m = attention_mask(1, 1, 3, None, Some(&[0, 1, 1, 1]), DType::F32, &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert_eq!(visible(&m), vec![vec![1, 2, 3]]);
    }
}

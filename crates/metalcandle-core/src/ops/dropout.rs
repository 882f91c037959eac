//! Dropout whose mask is a pure function of (run seed, optimizer step, micro-batch, site,
//! element index): a counter-based hash rather than a generator's stream. So the composed
//! path (a mask tensor), the fused path (applied in place, the mask recomputed in the
//! backward instead of kept) and a recomputing checkpointed block draw the same mask, the
//! thread count does not matter, and a resumed run redraws exactly the masks it would have.
//!
//! With data-parallel ranks, each holding a slice of the batch's rows, the element index is
//! the global one (the rank's first row counted in), so N ranks draw one process's masks.
//!
//! An element is kept with probability 1 - p and then scaled by 1 / (1 - p), as torch's
//! `nn.Dropout` does, so the expectation is unchanged.

use crate::rng::{mix, GOLDEN};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// Where in the model a mask applies; each site draws an independent mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Site {
    /// the embedding output (token embeddings plus positions)
    Embed,
    /// attention probabilities of layer i, [B, heads, T, T]
    AttnProbs(usize),
    /// the attention branch of layer i, after its output projection
    AttnOut(usize),
    /// the MLP branch of layer i, after its down projection
    MlpOut(usize),
}

impl Site {
    fn id(self) -> u64 {
        match self {
            Site::Embed => 0,
            Site::AttnProbs(l) => 1 + 3 * l as u64,
            Site::AttnOut(l) => 2 + 3 * l as u64,
            Site::MlpOut(l) => 3 + 3 * l as u64,
        }
    }
}

/// One micro-batch's dropout at rate `p`, or one site's when [`Dropout::at`] has chosen it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// elements whose 24-bit hash falls below this are dropped: round(p * 2^24)
    threshold: u32,
    scale: f32,
    key: u64,
    /// The first batch row this process holds (data-parallel ranks), and that row's first
    /// element index at the chosen site ([`Dropout::rows`]).
    first_row: u64,
    base: u64,
}

impl Dropout {
    /// The masks of micro-batch `micro` of the step after `step` optimizer steps, for a
    /// process holding the batch's rows from `first_row` on; `None` when `p` is 0.
    pub fn new(p: f64, seed: u64, step: u64, micro: u64, first_row: u64) -> Option<Self> {
        if p <= 0.0 {
            return None;
        }
        let mut key = mix(seed ^ 0x6472_6F70_6F75_7421);
        for x in [step, micro] {
            key = mix(key.wrapping_add(x.wrapping_mul(GOLDEN)));
        }
        Some(Dropout {
            threshold: (p * (1u64 << 24) as f64).round() as u32,
            scale: (1.0 / (1.0 - p)) as f32,
            key,
            first_row,
            base: 0,
        })
    }

    /// The mask of one site.
    pub fn at(self, site: Site) -> Self {
        Dropout {
            key: mix(self.key ^ site.id().wrapping_mul(GOLDEN)),
            ..self
        }
    }

    /// Counts element indices from this process's first row, at a site of `row_len` elements
    /// per batch row.
    pub fn rows(self, row_len: usize) -> Self {
        Dropout {
            base: self.first_row * row_len as u64,
            ..self
        }
    }

    /// 1 / (1 - p)
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether element `i` of this site is kept.
    #[inline(always)]
    pub fn keep(&self, i: u64) -> bool {
        let i = self.base + i;
        (mix(self.key.wrapping_add(i.wrapping_mul(GOLDEN))) >> 40) as u32 >= self.threshold
    }

    /// `x[j] *= mask[offset + j]`: 0 where dropped, 1 / (1 - p) where kept. The backward of a
    /// dropout is the same call on the incoming gradient.
    pub fn apply<T: num_traits::Float>(&self, x: &mut [T], offset: usize) {
        let scale = T::from(self.scale).unwrap();
        for (j, v) in x.iter_mut().enumerate() {
            *v = if self.keep((offset + j) as u64) {
                *v * scale
            } else {
                T::zero()
            };
        }
    }

    /// [`Dropout::apply`] over a large buffer, in parallel blocks.
    pub fn apply_par(&self, x: &mut [f32]) {
        const BLOCK: usize = 1 << 14;
        x.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(b, c)| self.apply(c, b * BLOCK));
    }

    /// The mask as a tensor (0 or 1 / (1 - p), in row-major element order), for the composed
    /// path: `x * mask` gives the bits [`Dropout::apply`] gives, and its gradient.
    pub fn mask(&self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let mut m = vec![1f32; shape.iter().product()];
        self.apply_par(&mut m);
        Tensor::from_vec(m, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// `x * mask`, differentiable; the first dimension of `x` is the batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let row_len = x.elem_count() / x.dim(0)?.max(1);
        x * self.rows(row_len).mask(x.dims(), x.dtype(), x.device())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_expected_fraction_and_scales_the_rest() {
        for p in [0.1, 0.5, 0.9] {
            let d = Dropout::new(p, 7, 3, 0, 0).unwrap().at(Site::MlpOut(2));
            let mut x = vec![1f32; 1 << 20];
            d.apply_par(&mut x);
            let zeros = x.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
            // 4 standard deviations of a binomial fraction over 2^20 draws
            let sd = (p * (1.0 - p) / x.len() as f64).sqrt();
            assert!((zeros - p).abs() < 4.0 * sd, "p {p}: dropped {zeros}");
            let scale = (1.0 / (1.0 - p)) as f32;
            assert!(x.iter().all(|&v| v == 0.0 || v == scale));
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
            assert!(
                (mean - 1.0).abs() < 4.0 * sd / (1.0 - p),
                "p {p}: mean {mean}"
            );
        }
    }

    #[test]
    fn masks_are_a_function_of_their_coordinates() {
        let d = Dropout::new(0.5, 1, 10, 2, 0).unwrap();
        let draw = |d: Dropout| -> Vec<bool> { (0..4096).map(|i| d.keep(i)).collect() };
        let base = draw(d.at(Site::Embed));
        assert_eq!(
            base,
            draw(Dropout::new(0.5, 1, 10, 2, 0).unwrap().at(Site::Embed))
        );
        // Every coordinate changes the mask: about half the entries differ.
        for other in [
            d.at(Site::AttnOut(0)),
            d.at(Site::MlpOut(0)),
            Dropout::new(0.5, 2, 10, 2, 0).unwrap().at(Site::Embed),
            Dropout::new(0.5, 1, 11, 2, 0).unwrap().at(Site::Embed),
            Dropout::new(0.5, 1, 10, 3, 0).unwrap().at(Site::Embed),
        ] {
            let differ = base
                .iter()
                .zip(draw(other))
                .filter(|(a, b)| **a != *b)
                .count();
            assert!((1700..2400).contains(&differ), "{differ} of 4096 differ");
        }
        assert_eq!(Dropout::new(0.0, 1, 10, 2, 0), None);
    }

    #[test]
    fn parallel_blocks_offsets_and_the_tensor_mask_agree() {
        let d = Dropout::new(0.3, 5, 0, 0, 0)
            .unwrap()
            .at(Site::AttnProbs(1));
        let n = 50_000;
        let x: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let mut whole = x.clone();
        d.apply_par(&mut whole);
        let mut pieces = x.clone();
        let (a, b) = pieces.split_at_mut(12_345);
        d.apply(a, 0);
        d.apply(b, 12_345);
        assert_eq!(whole, pieces);
        let t = Tensor::from_vec(x, n, &Device::Cpu).unwrap();
        let via_tensor = d.forward(&t).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(whole, via_tensor);
    }

    #[test]
    fn a_process_holding_later_rows_draws_their_part_of_the_whole_mask() {
        // 4 rows of 6 elements in one process; rows 2.. in another.
        let (p, seed, step, micro) = (0.5, 3, 1, 0);
        let whole = Dropout::new(p, seed, step, micro, 0)
            .unwrap()
            .at(Site::Embed);
        let mut all = vec![1f32; 24];
        whole.rows(6).apply(&mut all, 0);
        let part = Dropout::new(p, seed, step, micro, 2)
            .unwrap()
            .at(Site::Embed);
        let mut last = vec![1f32; 12];
        part.rows(6).apply(&mut last, 0);
        assert_eq!(&all[12..], &last[..]);
        let t = Tensor::ones((2, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let via_tensor = part.forward(&t).unwrap().flatten_all().unwrap();
        assert_eq!(via_tensor.to_vec1::<f32>().unwrap(), last);
    }
}

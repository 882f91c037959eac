//! Softmax over the last dimension, with its backward `dx = y * (g - sum(g * y))`.

use super::{
    by_dtype, cpu_tensor, dispatch_float, for_each_row, slice, use_cpu_kernel, with_slices, Elem,
};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType, D};
use num_traits::Float;

struct Softmax;

fn forward<T: Elem>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    for_each_row(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let max = xr.iter().fold(T::neg_infinity(), |m, v| Float::max(m, *v));
        let mut sum = T::zero();
        for j in 0..d {
            o[j] = (xr[j] - max).exp();
            sum += o[j];
        }
        for v in o.iter_mut() {
            *v /= sum;
        }
    });
    out
}

/// `dx * scale`, for a softmax whose input was scaled by `scale`.
pub(crate) fn backward<T: Elem>(y: &[T], g: &[T], d: usize, scale: T) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    for_each_row(&mut dx, d, |i, o| {
        let (yr, gr) = (&y[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let dot = (0..d).map(|j| yr[j] * gr[j]).sum::<T>();
        for j in 0..d {
            o[j] = yr[j] * (gr[j] - dot) * scale;
        }
    });
    dx
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = l.dims()[l.dims().len() - 1];
        dispatch_float!(s, "softmax-last-dim", |s: T| {
            let out = forward::<T>(slice(s, l)?, d);
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (g, d) = (g.contiguous()?, y.dim(D::Minus1)?);
        let dx = by_dtype!(y.dtype(), "softmax-last-dim", |T| with_slices::<T, _>(
            &[y, &g],
            |s| {
                cpu_tensor(
                    backward(s[0], s[1], d, <T as num_traits::One>::one()),
                    y.shape(),
                )
            }
        )?);
        Ok(Some(dx))
    }
}

pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if use_cpu_kernel(x) {
        return x.contiguous()?.apply_op1(Softmax);
    }
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    candle_nn::ops::softmax(x, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression() {
        let x = (rand_tensor(&[4, 7, 9], 1) * 5.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let d = max_abs_diff(
            &softmax_last_dim(&x).unwrap(),
            &candle_nn::ops::softmax(&x, D::Minus1).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        check_grads(
            &[(rand_tensor(&[3, 2, 5], 7) * 3.0).unwrap()],
            |a| softmax_last_dim(&a[0]),
            1e-6,
        );
    }
}

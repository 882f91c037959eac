//! Softmax over the last dimension, with its backward `dx = y * (g - sum(g * y))`; and the
//! attention form `softmax(x * scale + mask)` in one op, which keeps only its input and output
//! for the backward instead of the scaled and the masked scores as well.

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

pub(crate) fn backward<T: Elem>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    for_each_row(&mut dx, d, |i, o| {
        let (yr, gr) = (&y[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let dot = (0..d).map(|j| yr[j] * gr[j]).sum::<T>();
        for j in 0..d {
            o[j] = yr[j] * (gr[j] - dot);
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
            |s| { cpu_tensor(backward(s[0], s[1], d), y.shape()) }
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

/// `softmax(x * scale + mask)` for attention scores x [B, H, T, K] and an additive mask
/// [B or 1, 1, T, K]; the arithmetic of the composed expression, in its order.
struct MaskedSoftmax {
    scale: f64,
    /// Contiguous, [B or 1, 1, T, K].
    mask: Tensor,
}

/// Turns the scores x [B, H, T, K] (rows in that order) into `softmax(x * scale + mask)` in
/// place.
pub(crate) fn masked_in_place<T: Elem>(
    x: &mut [T],
    mask: &[T],
    dims: [usize; 4],
    mask_b: usize,
    scale: T,
) {
    let [_, h, t, k] = dims;
    for_each_row(x, k, |i, o| {
        let (b, ti) = (i / (h * t), i % t);
        let mrow = &mask[((b % mask_b) * t + ti) * k..][..k];
        for j in 0..k {
            o[j] = (o[j] * scale + T::zero()) + mrow[j];
        }
        let max = o.iter().fold(T::neg_infinity(), |m, v| Float::max(m, *v));
        let mut sum = T::zero();
        for v in o.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in o.iter_mut() {
            *v /= sum;
        }
    });
}

/// The input gradient of `softmax(x * scale + mask)` from its output y and upstream g.
pub(crate) fn masked_backward<T: Elem>(y: &[T], g: &[T], d: usize, scale: f64) -> Vec<T> {
    let mut dx = backward(y, g, d);
    let scale = num_traits::cast::<f64, T>(scale).unwrap();
    for v in dx.iter_mut() {
        *v = *v * scale + T::zero();
    }
    dx
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, t, k) = l.shape().dims4()?;
        let mask_b = self.mask.dim(0)?;
        dispatch_float!(s, "masked-softmax", |s: T| {
            let mut out = slice::<T>(s, l)?.to_vec();
            with_slices::<T, _>(&[&self.mask], |m| {
                let scale = num_traits::cast::<f64, T>(self.scale).unwrap();
                masked_in_place(&mut out, m[0], [b, h, t, k], mask_b, scale);
                Ok(())
            })?;
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (g, d) = (g.contiguous()?, y.dim(D::Minus1)?);
        let dx = by_dtype!(y.dtype(), "masked-softmax", |T| with_slices::<T, _>(
            &[y, &g],
            |s| cpu_tensor(masked_backward(s[0], s[1], d, self.scale), y.shape())
        )?);
        Ok(Some(dx))
    }
}

/// `softmax(x * scale + mask)`: x [B, H, T, K], mask [B or 1, 1, T, K].
pub fn masked_softmax(x: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    if use_cpu_kernel(x) && mask.dtype() == x.dtype() && mask.dim(1)? == 1 {
        let op = MaskedSoftmax {
            scale,
            mask: mask.contiguous()?,
        };
        return x.contiguous()?.apply_op1(op);
    }
    softmax_last_dim(&(x * scale)?.broadcast_add(mask)?)
}

#[cfg(test)]
mod masked_tests {
    use super::*;
    use crate::ops::gradcheck::{max_abs_diff, rand_tensor};
    use candle_core::Var;

    #[test]
    fn masked_softmax_is_the_composed_expression_with_its_gradient() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 4, 5], 1)).unwrap();
        let mask = crate::nn::mask::attention_mask(
            2,
            4,
            1,
            None,
            Some(&[1, 1, 1, 1, 1, 0, 1, 1, 1, 1]),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let fused = masked_softmax(&x, 0.3, &mask).unwrap();
        let composed =
            softmax_last_dim(&(x.as_tensor() * 0.3).unwrap().broadcast_add(&mask).unwrap())
                .unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0);
        let g = rand_tensor(&[2, 3, 4, 5], 2);
        let a = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let b = (composed * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_abs_diff(a.get(&x).unwrap(), b.get(&x).unwrap()) < 1e-15);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff, rand_tensor};

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

//! RMSNorm, `w * (x / sqrt(mean(x^2) + eps))` over the last dimension, with its backward.

use super::{
    by_dtype, cpu_tensor, dispatch_float, for_each_row, slice, use_cpu_kernel, with_slices, Elem,
};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, D};

struct RmsNorm {
    eps: f64,
}

fn inv_rms<T: Elem>(row: &[T], eps: f64) -> T {
    let ms = row.iter().map(|v| *v * *v).sum::<T>() / T::from(row.len()).unwrap();
    T::one() / (ms + T::from(eps).unwrap()).sqrt()
}

fn forward<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    for_each_row(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let r = inv_rms(xr, eps);
        for j in 0..d {
            o[j] = w[j] * (xr[j] * r);
        }
    });
    out
}

/// dx = r * (g*w - xhat * mean(g*w*xhat)), dw = sum_rows(g * xhat), with xhat = x * r.
fn backward<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let d = w.len();
    let mut dx = vec![T::zero(); x.len()];
    for_each_row(&mut dx, d, |i, o| {
        let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let r = inv_rms(xr, eps);
        let dot = (0..d).map(|j| gr[j] * w[j] * xr[j] * r).sum::<T>() / T::from(d).unwrap();
        for j in 0..d {
            o[j] = r * (gr[j] * w[j] - xr[j] * r * dot);
        }
    });
    let mut dw = vec![T::zero(); d];
    for (xr, gr) in x.chunks(d).zip(g.chunks(d)) {
        let r = inv_rms(xr, eps);
        for j in 0..d {
            dw[j] += gr[j] * xr[j] * r;
        }
    }
    (dx, dw)
}

// Kept apart from LayerNorm's op, which it resembles: RMSNorm has no mean and no bias, so it
// is a two-operand op with its own, shorter backward.
impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(xs, "rms-norm", |xs: T| {
            let out = forward::<T>(slice(xs, xl)?, slice(ws, wl)?, self.eps);
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw) = by_dtype!(x.dtype(), "rms-norm", |T| with_slices::<T, _>(
            &[x, w, &g],
            |s| {
                let (dx, dw) = backward(s[0], s[1], s[2], self.eps);
                Ok((cpu_tensor(dx, x.shape())?, cpu_tensor(dw, w.shape())?))
            }
        )?);
        Ok((Some(dx), Some(dw)))
    }
}

/// The composed (differentiable on every device) expression.
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&r)?.broadcast_mul(w)
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if use_cpu_kernel(x) {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
    }
    if !super::needs_grad(&[x, w]) {
        return candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32);
    }
    rms_norm_composed(x, w, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression() {
        let x = rand_tensor(&[3, 5, 8], 1)
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let w = (rand_tensor(&[8], 2) + 1.0)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let d = max_abs_diff(
            &rms_norm(&x, &w, 1e-6).unwrap(),
            &rms_norm_composed(&x, &w, 1e-6).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = rand_tensor(&[2, 3, 6], 3);
        let w = (rand_tensor(&[6], 4) + 1.0).unwrap();
        check_grads(&[x, w], |a| rms_norm(&a[0], &a[1], 1e-5), 1e-6);
    }
}

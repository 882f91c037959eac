//! LayerNorm, `(x - mean) / sqrt(var + eps) * w + b` over the last dimension, with backward.

use super::{
    by_dtype, cpu_tensor, dispatch_float, for_each_row, slice, use_cpu_kernel, with_slices, Elem,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType, D};

struct LayerNorm {
    eps: f64,
}

/// (mean, 1/sqrt(var + eps)) of a row, with the biased variance as torch uses.
fn stats<T: Elem>(row: &[T], eps: f64) -> (T, T) {
    let n = T::from(row.len()).unwrap();
    let mean = row.iter().copied().sum::<T>() / n;
    let var = row.iter().map(|v| (*v - mean) * (*v - mean)).sum::<T>() / n;
    (mean, T::one() / (var + T::from(eps).unwrap()).sqrt())
}

fn forward<T: Elem>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    for_each_row(&mut out, d, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let (mean, rstd) = stats(xr, eps);
        for j in 0..d {
            o[j] = (xr[j] - mean) * rstd * w[j] + b[j];
        }
    });
    out
}

/// dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)); dw = sum(g*xhat); db = sum(g).
fn backward<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = w.len();
    let inv_d = T::one() / T::from(d).unwrap();
    let mut dx = vec![T::zero(); x.len()];
    for_each_row(&mut dx, d, |i, o| {
        let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let (mean, rstd) = stats(xr, eps);
        let (mut m1, mut m2) = (T::zero(), T::zero());
        for j in 0..d {
            let gw = gr[j] * w[j];
            m1 += gw;
            m2 += gw * (xr[j] - mean) * rstd;
        }
        let (m1, m2) = (m1 * inv_d, m2 * inv_d);
        for j in 0..d {
            o[j] = rstd * (gr[j] * w[j] - m1 - (xr[j] - mean) * rstd * m2);
        }
    });
    let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
    for (xr, gr) in x.chunks(d).zip(g.chunks(d)) {
        let (mean, rstd) = stats(xr, eps);
        for j in 0..d {
            dw[j] += gr[j] * (xr[j] - mean) * rstd;
            db[j] += gr[j];
        }
    }
    (dx, dw, db)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(xs, "layer-norm", |xs: T| {
            let out = forward::<T>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?, self.eps);
            Ok((T::to_cpu_storage_owned(out), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw, db) = by_dtype!(x.dtype(), "layer-norm", |T| with_slices::<T, _>(
            &[x, w, &g],
            |s| {
                let (dx, dw, db) = backward(s[0], s[1], s[2], self.eps);
                Ok((
                    cpu_tensor(dx, x.shape())?,
                    cpu_tensor(dw, w.shape())?,
                    cpu_tensor(db, w.shape())?,
                ))
            }
        )?);
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    xc.broadcast_mul(&rstd)?.broadcast_mul(w)?.broadcast_add(b)
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if use_cpu_kernel(x) {
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps });
    }
    if !super::needs_grad(&[x, w, b]) {
        return candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps as f32);
    }
    layer_norm_composed(x, w, b, eps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression() {
        let x = ((rand_tensor(&[3, 4, 10], 1) * 3.0).unwrap() + 1.0).unwrap();
        let (w, b) = (rand_tensor(&[10], 2), rand_tensor(&[10], 3));
        let d = max_abs_diff(
            &layer_norm(&x, &w, &b, 1e-5).unwrap(),
            &layer_norm_composed(&x, &w, &b, 1e-5).unwrap(),
        );
        assert!(d < 1e-12, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = (rand_tensor(&[2, 3, 5], 4) * 2.0).unwrap();
        check_grads(
            &[x, rand_tensor(&[5], 5), rand_tensor(&[5], 6)],
            |a| layer_norm(&a[0], &a[1], &a[2], 1e-5),
            1e-6,
        );
    }
}

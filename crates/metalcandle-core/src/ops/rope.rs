//! Rotary position embeddings in the rotate-half (GPT-NeoX, Hugging Face) layout:
//! `y = x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x[d/2:], x[:d/2])`.
//! The backward is the inverse rotation.

use super::{dispatch_float, slice, use_cpu_kernel, with_slices, Elem, PAR_MIN_ELEMS};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType, D};

/// `cos`/`sin` are [B or 1, T, D/2]; the input is [B, T, H, D].
struct Rope {
    cos: Tensor,
    sin: Tensor,
    inverse: bool,
}

fn rotate<T: Elem>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: (usize, usize, usize, usize),
    cs_batch: bool,
    inverse: bool,
) -> Vec<T> {
    use rayon::prelude::*;
    let (_b, t, h, d) = dims;
    let half = d / 2;
    let mut out = vec![T::zero(); x.len()];
    // One chunk per (batch, position): all heads share that position's angles.
    let body = |(bt, o): (usize, &mut [T])| {
        let cs_row = if cs_batch { bt } else { bt % t };
        let (c, s) = (
            &cos[cs_row * half..(cs_row + 1) * half],
            &sin[cs_row * half..(cs_row + 1) * half],
        );
        for hh in 0..h {
            let xo = bt * h * d + hh * d;
            let (xr, orow) = (&x[xo..xo + d], &mut o[hh * d..(hh + 1) * d]);
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                let sn = if inverse { -s[i] } else { s[i] };
                orow[i] = x1 * c[i] + (-x2) * sn;
                orow[i + half] = x2 * c[i] + x1 * sn;
            }
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(h * d).enumerate().for_each(body);
    } else {
        out.chunks_mut(h * d).enumerate().for_each(body);
    }
    out
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = l.shape().dims4()?;
        let cs_batch = self.cos.dim(0)? == b && b > 1;
        dispatch_float!(s, "rope", |s: T| {
            let out = with_slices::<T, _>(&[&self.cos, &self.sin], |cs| {
                Ok(rotate::<T>(
                    slice(s, l)?,
                    cs[0],
                    cs[1],
                    (b, t, h, d),
                    cs_batch,
                    self.inverse,
                ))
            })?;
            Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inv)?))
    }
}

/// The composed expression: differentiable on every device.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (b, t, _, _) = x.dims4()?;
    let full = |c: &Tensor| -> Result<Tensor> { Tensor::cat(&[c, c], D::Minus1)?.unsqueeze(2) };
    let (cos, sin) = (full(cos)?, full(sin)?);
    let (cos, sin) = (
        cos.broadcast_as((b, t, 1, 2 * half))?,
        sin.broadcast_as((b, t, 1, 2 * half))?,
    );
    let rot = Tensor::cat(
        &[
            &x.narrow(D::Minus1, half, half)?.neg()?,
            &x.narrow(D::Minus1, 0, half)?,
        ],
        D::Minus1,
    )?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Rotates `x` [B, T, H, D] by the angles whose cos/sin are given as [B or 1, T, D/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if use_cpu_kernel(x) {
        let (cos, sin) = (
            cos.to_dtype(x.dtype())?.contiguous()?,
            sin.to_dtype(x.dtype())?.contiguous()?,
        );
        return x.contiguous()?.apply_op1(Rope {
            cos,
            sin,
            inverse: false,
        });
    }
    rope_composed(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression() {
        let x = rand_tensor(&[2, 5, 3, 8], 1);
        let ang = (rand_tensor(&[2, 5, 4], 2) * 3.0).unwrap();
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        let d = max_abs_diff(
            &rope(&x, &c, &s).unwrap(),
            &rope_composed(&x, &c, &s).unwrap(),
        );
        assert!(d < 1e-12, "{d}");
        // Broadcast over the batch.
        let (c1, s1) = (c.narrow(0, 0, 1).unwrap(), s.narrow(0, 0, 1).unwrap());
        let d = max_abs_diff(
            &rope(&x, &c1, &s1).unwrap(),
            &rope_composed(&x, &c1, &s1).unwrap(),
        );
        assert!(d < 1e-12, "{d}");
    }

    #[test]
    fn rotation_preserves_norm_and_zero_angle_is_identity() {
        let x = rand_tensor(&[1, 3, 2, 6], 5);
        let zero = Tensor::zeros(
            (1, 3, 3),
            candle_core::DType::F64,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let y = rope(&x, &zero.cos().unwrap(), &zero.sin().unwrap()).unwrap();
        assert!(max_abs_diff(&x, &y) == 0.0);
        let ang = rand_tensor(&[1, 3, 3], 6);
        let y = rope(&x, &ang.cos().unwrap(), &ang.sin().unwrap()).unwrap();
        let n = |t: &Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!((n(&x) - n(&y)).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let ang = (rand_tensor(&[2, 3, 2], 9) * 2.0).unwrap();
        let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
        check_grads(
            &[rand_tensor(&[2, 3, 2, 4], 8)],
            |a| rope(&a[0], &c, &s),
            1e-6,
        );
    }
}

//! SwiGLU's gate, `silu(gate) * up`, fused with its backward.

use super::{
    by_dtype, cpu_tensor, dispatch_float, par_fill, slice, use_cpu_kernel, with_slices, Elem,
};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

struct SwiGlu;

pub(crate) fn sigmoid<T: Elem>(x: T) -> T {
    T::one() / (T::one() + (-x).exp_fast())
}

fn forward<T: Elem>(g: &[T], u: &[T]) -> Vec<T> {
    par_fill(g.len(), |at, out| {
        for ((o, &g), &u) in out.iter_mut().zip(&g[at..]).zip(&u[at..]) {
            *o = g * sigmoid(g) * u;
        }
    })
}

/// d gate = dy * up * s * (1 + gate * (1 - s)) with s = sigmoid(gate); d up = dy * silu(gate).
fn backward<T: Elem>(g: &[T], u: &[T], d: &[T]) -> (Vec<T>, Vec<T>) {
    let dg = par_fill(g.len(), |at, out| {
        for (((o, &g), &u), &d) in out.iter_mut().zip(&g[at..]).zip(&u[at..]).zip(&d[at..]) {
            let sg = sigmoid(g);
            *o = d * u * sg * (T::one() + g * (T::one() - sg));
        }
    });
    let du = par_fill(g.len(), |at, out| {
        for ((o, &g), &d) in out.iter_mut().zip(&g[at..]).zip(&d[at..]) {
            *o = d * g * sigmoid(g);
        }
    });
    (dg, du)
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.shape() != ul.shape() {
            candle_core::bail!(
                "swiglu: gate {:?} and up {:?} differ in shape",
                gl.shape(),
                ul.shape()
            );
        }
        dispatch_float!(gs, "swiglu", |gs: T| {
            let out = forward::<T>(slice(gs, gl)?, slice(us, ul)?);
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (dg, du) = by_dtype!(gate.dtype(), "swiglu", |T| with_slices::<T, _>(
            &[gate, up, &dy],
            |s| {
                let (dg, du) = backward(s[0], s[1], s[2]);
                Ok((cpu_tensor(dg, gate.shape())?, cpu_tensor(du, up.shape())?))
            }
        )?);
        Ok((Some(dg), Some(du)))
    }
}

pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if use_cpu_kernel(gate) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression() {
        let g = (rand_tensor(&[3, 40], 1) * 4.0).unwrap();
        let u = rand_tensor(&[3, 40], 2);
        let d = max_abs_diff(&swiglu(&g, &u).unwrap(), &(g.silu().unwrap() * &u).unwrap());
        assert!(d < 1e-12, "{d}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let g = (rand_tensor(&[2, 7], 3) * 3.0).unwrap();
        check_grads(
            &[g, rand_tensor(&[2, 7], 4)],
            |a| swiglu(&a[0], &a[1]),
            1e-6,
        );
    }
}

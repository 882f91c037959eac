//! `x @ W^T` for a frozen weight: its backward returns the input gradient only. candle's
//! matmul backward would also compute `x^T @ g` for the weight (as costly as the forward)
//! and keep it, although nothing uses it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenLinear {
    /// [out, in], contiguous
    w: Tensor,
}

/// `x @ W^T` on backend storage: x [.., k] and W [n, k], both contiguous.
pub(crate) fn linear_storage<S: BackendStorage>(
    xs: &S,
    xl: &Layout,
    ws: &S,
    wl: &Layout,
) -> Result<(S, Shape)> {
    let (n, k) = wl.shape().dims2()?;
    let dims = xl.dims();
    if dims.last() != Some(&k) {
        candle_core::bail!(
            "frozen linear: input {:?} does not end in the weight's input size {k}",
            dims
        );
    }
    let m = xl.shape().elem_count() / k;
    let Some((x_off, _)) = xl.contiguous_offsets() else {
        candle_core::bail!("frozen linear: input must be contiguous")
    };
    let Some((w_off, _)) = wl.contiguous_offsets() else {
        candle_core::bail!("frozen linear: weight must be contiguous")
    };
    let lhs = Layout::contiguous_with_offset((1, m, k), x_off);
    let rhs = Layout::new(Shape::from((1, k, n)), vec![n * k, 1, k], w_off);
    let out = xs.matmul(ws, (1, m, n, k), &lhs, &rhs)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    Ok((out, Shape::from(out_dims)))
}

/// A decoding step's product (a few rows of float32 x) through the memory-bound kernel.
fn few_rows(
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(_), CpuStorage::F32(_)) = (xs, ws) else {
        return Ok(None);
    };
    let (n, k) = wl.shape().dims2()?;
    let dims = xl.dims();
    let m = xl.shape().elem_count() / k.max(1);
    if dims.last() != Some(&k) || m > super::float_gemv::MAX_ROWS {
        return Ok(None);
    }
    let (x, w) = (super::slice::<f32>(xs, xl)?, super::slice::<f32>(ws, wl)?);
    let Some(y) = super::float_gemv::try_forward(w, n, k, x, m) else {
        return Ok(None);
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = n;
    Ok(Some((CpuStorage::F32(y), Shape::from(out_dims))))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cpu(ws) => {
                if let Some(out) = few_rows(s, l, ws, wl)? {
                    return Ok(out);
                }
                linear_storage(s, l, ws, wl)
            }
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    // One method per backend, as candle's custom ops ask: each takes its own storage type and
    // is compiled only with its feature, so the three cannot share one body.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Cuda(ws) => linear_storage(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        let (ws, wl) = self.w.storage_and_layout();
        match &*ws {
            Storage::Metal(ws) => linear_storage(s, l, ws, wl),
            _ => candle_core::bail!("frozen linear: weight and input on different devices"),
        }
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.w.dims2()?;
        let m = g.elem_count() / n;
        let dx = g.contiguous()?.reshape((m, n))?.matmul(&self.w)?;
        debug_assert_eq!(dx.dims(), &[m, k]);
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x @ w^T`, for any weight `w` [out, in]: a frozen (untracked) one takes the op above, whose
/// backward skips the weight's gradient; a trainable one takes candle's matmul, whose backward
/// reaches both operands.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.track_op() {
        return x.broadcast_matmul(&w.t()?);
    }
    x.contiguous()?
        .apply_op1(FrozenLinear { w: w.contiguous()? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;
    use candle_core::Var;

    #[test]
    fn matches_matmul() {
        let x = rand_tensor(&[2, 3, 5], 1);
        let w = rand_tensor(&[4, 5], 2);
        let d = max_abs_diff(
            &linear(&x, &w).unwrap(),
            &x.broadcast_matmul(&w.t().unwrap()).unwrap(),
        );
        assert!(d < 1e-12, "{d}");
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let w = rand_tensor(&[4, 5], 2);
        check_grads(&[rand_tensor(&[2, 3, 5], 1)], |a| linear(&a[0], &w), 1e-6);
    }

    #[test]
    fn no_gradient_is_computed_for_the_frozen_weight() {
        let x = Var::from_tensor(&rand_tensor(&[2, 5], 1)).unwrap();
        let w = rand_tensor(&[3, 5], 2);
        let grads = linear(&x, &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&w).is_none());
        // candle's own matmul computes and keeps a gradient for its untracked operand.
        let wt = w.t().unwrap();
        let grads = x
            .matmul(&wt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&wt).is_some());
    }
}

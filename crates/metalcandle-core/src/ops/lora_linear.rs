//! A LoRA-adapted frozen linear in one op: `y = x W^T + bias + s (x A^T) B^T`. Composed from
//! tensor ops, the branch keeps three output-sized tensors per layer alive until the backward
//! pass (the product, its scaled copy and the sum); here only `x A^T` ([.., r]) is kept, and
//! the backward is written out: dx = g W + s (g B) A, dA = s (g B)^T x, dB = s g^T (x A^T).

use crate::nn::Weight;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

struct LoraLinear {
    w: Weight,
    scale: f64,
    /// x A^T, [.., r]
    xa: Tensor,
    /// The output, computed before the op is attached to the graph; taken by the forward.
    y: Mutex<Option<Tensor>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = self.y.lock().unwrap().take();
        let Some(y) = y else {
            candle_core::bail!("lora-linear: the forward runs once")
        };
        let (s, l) = y.storage_and_layout();
        match (&*s, l.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                Ok((CpuStorage::F32(v[a..b].to_vec()), y.shape().clone()))
            }
            (Storage::Cpu(CpuStorage::F64(v)), Some((a, b))) => {
                Ok((CpuStorage::F64(v[a..b].to_vec()), y.shape().clone()))
            }
            _ => candle_core::bail!("lora-linear: contiguous f32/f64 CPU output expected"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, k) = a.dims2()?;
        let n = b.dim(0)?;
        let m = g.elem_count() / n;
        let g2 = g.contiguous()?.reshape((m, n))?;
        let x2 = x.detach().reshape((m, k))?;
        let xa2 = self.xa.reshape((m, r))?;
        let (ad, bd) = (a.detach(), b.detach());
        let gb = g2.matmul(&bd)?;
        let dx = if x.track_op() {
            let base = self.w.input_grad(&g2)?;
            Some((base + gb.matmul(&ad)?.affine(self.scale, 0.0)?)?.reshape(x.shape())?)
        } else {
            None
        };
        let da = gb.t()?.matmul(&x2)?.affine(self.scale, 0.0)?;
        let db = g2.t()?.matmul(&xa2)?.affine(self.scale, 0.0)?;
        Ok((dx, Some(da), Some(db)))
    }
}

/// `x W^T + bias + scale * (x A^T) B^T` with W (and bias) frozen, A [r, in] and B [out, r]
/// trainable; on CPU float tensors.
pub fn lora_linear(
    x: &Tensor,
    w: &Weight,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let xd = x.detach();
    let xa = xd.broadcast_matmul(&a.detach().t()?)?;
    let mut y = w.linear(&xd)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach())?;
    }
    let y = (y + (xa.broadcast_matmul(&b.detach().t()?)? * scale)?)?;
    if !(x.track_op() || a.track_op() || b.track_op()) {
        return Ok(y);
    }
    let op = LoraLinear {
        w: w.clone(),
        scale,
        xa,
        y: Mutex::new(Some(y.contiguous()?)),
    };
    x.apply_op3(a, b, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_abs_diff, rand_tensor};
    use candle_core::Var;

    #[test]
    fn matches_the_composed_branch_in_value_and_gradients() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 5], 1)).unwrap();
        let w = rand_tensor(&[4, 5], 2);
        let bias = rand_tensor(&[4], 3);
        let a = Var::from_tensor(&rand_tensor(&[2, 5], 4)).unwrap();
        let b = Var::from_tensor(&rand_tensor(&[4, 2], 5)).unwrap();
        let fused = lora_linear(&x, &Weight::Float(w.clone()), Some(&bias), &a, &b, 0.5).unwrap();
        let composed = ((crate::ops::frozen_linear(&x, &w)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap())
            + (x.broadcast_matmul(&a.t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.t().unwrap())
                .unwrap()
                * 0.5)
                .unwrap())
        .unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0);
        let g = rand_tensor(&[2, 3, 4], 6);
        let gf = (fused * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (composed * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &a, &b] {
            let d = max_abs_diff(gf.get(v).unwrap(), gc.get(v).unwrap());
            assert!(d < 1e-12, "{d}");
        }
        assert!(gf.get(&w).is_none());
    }
}

//! A LoRA-adapted frozen linear in one op: `y = x W^T + bias + s (x A^T) B^T`. Composed from
//! tensor ops, the branch keeps three output-sized tensors per layer alive until the backward
//! pass (the product, its scaled copy and the sum); this op keeps none of them. Its backward
//! recomputes `x A^T` ([.., r], cheap) and writes the rest out:
//! dx = g W + s (g B) A, dA = s (g B)^T x, dB = s g^T (x A^T).

use super::frozen_matmul::linear_storage;
use super::slice;
use crate::nn::Weight;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

struct LoraLinear {
    /// Contiguous.
    w: Weight,
    bias: Option<Tensor>,
    scale: f64,
}

/// `(base + bias) + (d * scale + 0)`: the composed expression's arithmetic, in its order.
fn combine<T: super::Elem>(y: &mut [T], bias: Option<&[T]>, d: &[T], scale: f64) {
    let scale = T::from(scale).unwrap();
    for (i, (y, dv)) in y.iter_mut().zip(d).enumerate() {
        let base = match bias {
            Some(b) => *y + b[i % b.len()],
            None => *y,
        };
        *y = base + (*dv * scale + T::zero());
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (mut y, shape) = match &self.w {
            Weight::Float(w) => {
                let (ws, wl) = w.storage_and_layout();
                let Storage::Cpu(ws) = &*ws else {
                    candle_core::bail!("lora-linear: weight and input on different devices")
                };
                linear_storage(xs, xl, ws, wl)?
            }
            Weight::Quantized(q) => q.cpu_fwd(xs, xl)?,
        };
        let (xa, xa_shape) = linear_storage(xs, xl, a_s, al)?;
        let (d, _) = linear_storage(&xa, &Layout::contiguous(xa_shape), bs, bl)?;
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some((s, *l)),
                _ => candle_core::bail!("lora-linear: bias on another device"),
            },
            None => None,
        };
        match (&mut y, &d) {
            (CpuStorage::F32(y), CpuStorage::F32(d)) => {
                let b = bias.map(|(s, l)| slice::<f32>(s, l)).transpose()?;
                combine(y, b, d, self.scale)
            }
            (CpuStorage::F64(y), CpuStorage::F64(d)) => {
                let b = bias.map(|(s, l)| slice::<f64>(s, l)).transpose()?;
                combine(y, b, d, self.scale)
            }
            _ => candle_core::bail!("lora-linear: f32 or f64 expected"),
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, k) = a.dims2()?;
        let n = b.dim(0)?;
        let m = g.elem_count() / n;
        let g2 = g.contiguous()?.reshape((m, n))?;
        let x2 = x.detach().reshape((m, k))?;
        let (ad, bd) = (a.detach(), b.detach());
        let xa = x2.matmul(&ad.t()?)?;
        let gb = g2.matmul(&bd)?;
        let dx = if x.track_op() {
            let base = self.w.input_grad(&g2)?;
            Some((base + gb.matmul(&ad)?.affine(self.scale, 0.0)?)?.reshape(x.shape())?)
        } else {
            None
        };
        let da = gb.t()?.matmul(&x2)?.affine(self.scale, 0.0)?;
        let db = g2.t()?.matmul(&xa)?.affine(self.scale, 0.0)?;
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
    let w = match w {
        Weight::Float(t) => Weight::Float(t.detach().contiguous()?),
        q => q.clone(),
    };
    let op = LoraLinear {
        w,
        bias: bias.map(|b| b.detach().contiguous()).transpose()?,
        scale,
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use crate::testing::rand_tensor;
    use candle_core::Var;

    /// The adapter branch as tensor ops: `scale * (x A^T) B^T`.
    fn branch(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Tensor {
        let xa = x.broadcast_matmul(&a.t().unwrap()).unwrap();
        (xa.broadcast_matmul(&b.t().unwrap()).unwrap() * scale).unwrap()
    }

    #[test]
    fn matches_the_composed_branch_in_value_and_gradients() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 5], 1)).unwrap();
        let w = rand_tensor(&[4, 5], 2);
        let bias = rand_tensor(&[4], 3);
        let a = Var::from_tensor(&rand_tensor(&[2, 5], 4)).unwrap();
        let b = Var::from_tensor(&rand_tensor(&[4, 2], 5)).unwrap();
        let fused = lora_linear(&x, &Weight::Float(w.clone()), Some(&bias), &a, &b, 0.5).unwrap();
        let base = crate::ops::linear(&x, &w)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let composed = (base + branch(&x, &a, &b, 0.5)).unwrap();
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

    #[test]
    fn a_quantized_base_gives_the_composed_value() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::DType;
        let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
        let x = Var::from_tensor(&f32(rand_tensor(&[1, 3, 32], 1))).unwrap();
        let q = QTensor::quantize(&f32(rand_tensor(&[4, 32], 2)), GgmlDType::Q8_0).unwrap();
        let q = std::sync::Arc::new(crate::nn::QuantizedMatrix::new(q).unwrap());
        let a = Var::from_tensor(&f32(rand_tensor(&[2, 32], 4))).unwrap();
        let b = Var::from_tensor(&f32(rand_tensor(&[4, 2], 5))).unwrap();
        let fused = lora_linear(&x, &Weight::Quantized(q.clone()), None, &a, &b, 0.5).unwrap();
        let composed =
            (crate::ops::quantized_linear(&x, &q).unwrap() + branch(&x, &a, &b, 0.5)).unwrap();
        assert_eq!(max_abs_diff(&fused, &composed), 0.0);
    }
}

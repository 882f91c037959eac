//! `x @ W^T` for a block-quantized frozen weight. The forward is our integer kernel for q4_0
//! and q8_0 on the CPU (quantized_gemm.rs), candle's quantized matmul for the other formats
//! (which has no backward at all);
//! the backward here returns the input gradient `g @ dequant(W)`, so LoRA adapters train on
//! top of a quantized base (QLoRA). The float copy of W lives only while one layer's backward
//! runs.

use crate::nn::QuantizedMatrix;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::Arc;

struct QuantizedLinear(Arc<QuantizedMatrix>);

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(s, l)
    }

    // One method per backend, as candle's custom ops ask (see frozen_matmul.rs); on a GPU the
    // matrix is always candle's, never our CPU layout.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.candle()?.cuda_fwd(s, l)
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> Result<(candle_core::MetalStorage, Shape)> {
        self.0.candle()?.metal_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (n, _k) = self.0.shape().dims2()?;
        let w = self.0.dequantize(x.device())?;
        let m = g.elem_count() / n;
        let dx = g.contiguous()?.reshape((m, n))?.matmul(&w)?;
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// `x @ W^T` for a quantized W [out, in]: float32 in, float32 out, input gradient only.
pub fn quantized_linear(x: &Tensor, w: &Arc<QuantizedMatrix>) -> Result<Tensor> {
    let k = w.shape().dims2()?.1;
    if x.dims().last() != Some(&k) {
        candle_core::bail!(
            "quantized linear: input {:?} does not end in the weight's input size {k}",
            x.dims()
        );
    }
    x.contiguous()?.apply_op1(QuantizedLinear(w.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{max_rel_diff, rand_tensor};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Var};

    fn setup(dtype: GgmlDType) -> (Tensor, Arc<QuantizedMatrix>, Tensor) {
        let x = rand_tensor(&[2, 3, 64], 1).to_dtype(DType::F32).unwrap();
        let w = rand_tensor(&[8, 64], 2).to_dtype(DType::F32).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let q = Arc::new(QuantizedMatrix::new(q).unwrap());
        let wd = q.dequantize(&candle_core::Device::Cpu).unwrap();
        (x, q, wd)
    }

    #[test]
    fn forward_matches_dequantized_matmul() {
        // The kernel also rounds the activations to 8 bits per block of 32, so the product
        // differs from the dequantized one by about |x| |w| / 127 per term at most.
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
            let (x, q, wd) = setup(dtype);
            let got = quantized_linear(&x, &q).unwrap();
            let want = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
            let rel = max_rel_diff(&got, &want);
            assert!(rel < 2e-2, "{dtype:?}: relative error {rel}");
        }
    }

    #[test]
    fn input_gradient_is_that_of_the_dequantized_weight() {
        let (x, q, wd) = setup(GgmlDType::Q4_0);
        let xv = Var::from_tensor(&x).unwrap();
        let g = rand_tensor(&[2, 3, 8], 3).to_dtype(DType::F32).unwrap();
        let loss = (quantized_linear(&xv, &q).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let got = loss.backward().unwrap().get(&xv).unwrap().clone();
        // d/dx sum(g * x W^T) = g W, in closed form.
        let want = g.broadcast_matmul(&wd).unwrap();
        let d = crate::ops::gradcheck::max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{d}");
    }
}

//! A weight matrix [out, in] held in float, or in one of ggml's block-quantized formats.

use super::QuantizedMatrix;
use crate::ops;
use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Weight {
    Float(Tensor),
    Quantized(Arc<QuantizedMatrix>),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Float(t) => t.dims(),
            Weight::Quantized(q) => q.shape().dims(),
        }
    }

    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    /// The float tensor, None when quantized.
    pub fn float(&self) -> Option<&Tensor> {
        match self {
            Weight::Float(t) => Some(t),
            Weight::Quantized(_) => None,
        }
    }

    pub fn float_mut(&mut self) -> Option<&mut Tensor> {
        match self {
            Weight::Float(t) => Some(t),
            Weight::Quantized(_) => None,
        }
    }

    pub fn quant_format(&self) -> Option<GgmlDType> {
        match self {
            Weight::Float(_) => None,
            Weight::Quantized(q) => Some(q.dtype()),
        }
    }

    /// `x @ W^T`; the backward yields the input gradient only (the weight is frozen).
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Float(w) => ops::linear(x, w),
            Weight::Quantized(q) => ops::quantized_linear(x, q),
        }
    }

    /// `g @ W` for g [m, out]: the input gradient of `linear` (W dequantized for the product
    /// when quantized, then dropped).
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Float(w) => g.matmul(&w.detach()),
            Weight::Quantized(q) => g.matmul(&q.dequantize(g.device())?),
        }
    }

    /// Rows `ids` [B, T] (u32) as [B, T, in].
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Float(w) => {
                let (b, t) = ids.dims2()?;
                w.index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, t, w.dim(1)?))
            }
            Weight::Quantized(q) => q.embedding(ids),
        }
    }

    /// The weight in float32 on its device (a copy when quantized).
    pub fn to_float(&self) -> Result<Tensor> {
        match self {
            Weight::Float(w) => Ok(w.clone()),
            Weight::Quantized(q) => q.dequantize(&q.device()),
        }
    }
}

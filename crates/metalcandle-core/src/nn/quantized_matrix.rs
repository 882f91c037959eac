//! A block-quantized weight matrix [out, in]. On a CPU with AVX2, FMA and F16C, q4_0 and q8_0
//! matrices are held in the interleaved layout our integer kernel reads
//! (ops/interleaved_blocks.rs) instead of ggml's, not beside it, so the model is in memory
//! once; they go back to ggml's blocks only when a file is written. Every other format and
//! device keeps candle's `QTensor` and its kernels.

use crate::ops::int8_dot::{self, Path};
use crate::ops::interleaved_blocks::{Format, Interleaved};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

pub struct QuantizedMatrix {
    shape: Shape,
    repr: Repr,
}

enum Repr {
    Candle(Arc<QTensor>),
    Interleaved(Interleaved, Path),
}

impl std::fmt::Debug for QuantizedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantizedMatrix({:?}, {:?})", self.dtype(), self.shape)
    }
}

impl QuantizedMatrix {
    /// Takes candle's blocks, regrouped for our kernel where it runs.
    pub fn new(q: QTensor) -> Result<Self> {
        let shape = q.shape().clone();
        let format = Format::of(q.dtype()).filter(|_| q.device().is_cpu());
        let repr = match (format, int8_dot::detect()) {
            (Some(format), Some(path)) => {
                let (n, k) = shape.dims2()?;
                Repr::Interleaved(Interleaved::pack(format, n, k, &q.data()?)?, path)
            }
            _ => Repr::Candle(Arc::new(q)),
        };
        Ok(QuantizedMatrix { shape, repr })
    }

    pub fn dtype(&self) -> GgmlDType {
        match &self.repr {
            Repr::Candle(q) => q.dtype(),
            Repr::Interleaved(il, _) => il.format.dtype(),
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn device(&self) -> Device {
        match &self.repr {
            Repr::Candle(q) => q.device(),
            Repr::Interleaved(..) => Device::Cpu,
        }
    }

    /// Bytes held (blocks and scales; padding rows of the last group included).
    pub fn storage_size_in_bytes(&self) -> usize {
        match &self.repr {
            Repr::Candle(q) => q.storage_size_in_bytes(),
            Repr::Interleaved(il, _) => il.storage_bytes(),
        }
    }

    /// ggml's blocks as candle's tensor on the CPU, for writing a file.
    pub fn to_qtensor(&self) -> Result<Arc<QTensor>> {
        match &self.repr {
            Repr::Candle(q) if q.device().is_cpu() => Ok(q.clone()),
            Repr::Candle(q) => Ok(Arc::new(QTensor::new(
                QStorage::from_data(q.data()?, &Device::Cpu, q.dtype())?,
                q.shape().clone(),
            )?)),
            Repr::Interleaved(il, _) => Ok(Arc::new(QTensor::new(
                QStorage::from_data(il.unpack().into(), &Device::Cpu, il.format.dtype())?,
                self.shape.clone(),
            )?)),
        }
    }

    /// The matrix in float32 on `device`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match &self.repr {
            Repr::Candle(q) => q.dequantize(device),
            Repr::Interleaved(il, _) => {
                let mut out = vec![0f32; il.n * il.k];
                let addr = out.as_mut_ptr() as usize;
                candle_core::utils::barrier_pool().execute_chunked(il.n, |rows| {
                    // SAFETY: the row ranges handed out are disjoint.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(
                            (addr as *mut f32).add(rows.start * il.k),
                            rows.len() * il.k,
                        )
                    };
                    for (r, row) in rows.zip(out.chunks_exact_mut(il.k)) {
                        il.dequantize_row(r, row);
                    }
                });
                Tensor::from_vec(out, (il.n, il.k), &Device::Cpu)?.to_device(device)
            }
        }
    }

    /// Rows `ids` (u32, any shape) as [.., in] in float32.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        let il = match &self.repr {
            Repr::Candle(q) => return q.embedding(ids),
            Repr::Interleaved(il, _) => il,
        };
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        if let Some(&bad) = flat.iter().find(|&&i| i as usize >= il.n) {
            candle_core::bail!("embedding: token id {bad} is outside the {} rows", il.n);
        }
        let mut out = vec![0f32; flat.len() * il.k];
        for (&id, row) in flat.iter().zip(out.chunks_exact_mut(il.k)) {
            il.dequantize_row(id as usize, row);
        }
        let mut dims = ids.dims().to_vec();
        dims.push(il.k);
        Tensor::from_vec(out, dims, &Device::Cpu)?.to_device(ids.device())
    }

    /// `x @ W^T` on CPU storage: x [.., in] contiguous.
    pub(crate) fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match &self.repr {
            Repr::Candle(q) => candle_core::CustomOp1::cpu_fwd(&**q, s, l),
            Repr::Interleaved(il, path) => {
                let CpuStorage::F32(_) = s else {
                    candle_core::bail!("quantized linear: expected a float32 input");
                };
                let x = crate::ops::slice::<f32>(s, l)?;
                let y = crate::ops::quantized_gemm::forward(*path, il, x, x.len() / il.k);
                let mut dims = l.dims().to_vec();
                *dims.last_mut().expect("input has a last dimension") = il.n;
                Ok((CpuStorage::F32(y), Shape::from(dims)))
            }
        }
    }

    /// candle's tensor, for the GPU backends (our layout is only ever on the CPU).
    #[cfg(any(feature = "cuda", feature = "metal"))]
    pub(crate) fn candle(&self) -> Result<&QTensor> {
        match &self.repr {
            Repr::Candle(q) => Ok(q),
            Repr::Interleaved(..) => candle_core::bail!("quantized linear: a CPU matrix"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand_tensor;

    /// Whatever layout the matrix is held in, it reads back as candle's blocks.
    #[test]
    fn holds_the_same_blocks_as_candle() {
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K] {
            let w = rand_tensor(&[20, 256], 5).to_dtype(DType::F32).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap();
            let m = QuantizedMatrix::new(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            assert_eq!(m.dtype(), dtype);
            assert_eq!(m.to_qtensor().unwrap().data().unwrap(), q.data().unwrap());
            let got = m.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
            let ids = Tensor::new(&[[3u32, 19], [0, 3]], &Device::Cpu).unwrap();
            let rows = m.embedding(&ids).unwrap();
            assert_eq!(rows.dims(), &[2, 2, 256]);
            let want = want.index_select(&ids.flatten_all().unwrap(), 0).unwrap();
            assert_eq!(
                rows.reshape((4, 256)).unwrap().to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn an_embedding_id_past_the_rows_is_an_error() {
        let w = rand_tensor(&[8, 64], 5).to_dtype(DType::F32).unwrap();
        let m = QuantizedMatrix::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
        let ids = Tensor::new(&[[8u32]], &Device::Cpu).unwrap();
        assert!(m.embedding(&ids).is_err());
    }
}

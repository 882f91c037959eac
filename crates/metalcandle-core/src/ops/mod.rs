//! Differentiable kernels. candle's fused kernels (rms_norm, softmax_last_dim, layer_norm,
//! rope) carry no backward and its matmul backward also differentiates frozen weights, so
//! training needs ops of our own: each file holds one op's CPU forward and backward and its
//! finite-difference test. Off the CPU the public functions fall back to candle's fused
//! kernel when nothing needs a gradient, or to the composed (differentiable) expression.

pub mod activation;
pub mod adamw;
pub mod attention_probs;
pub mod cross_entropy;
pub mod dropout;
pub mod fast_exp;
pub mod flash_attention;
pub(crate) mod float_gemv;
pub mod frozen_matmul;
pub(crate) mod gemm;
pub mod head_loss;
pub(crate) mod int8_dot;
pub(crate) mod interleaved_blocks;
pub mod layer_norm;
pub mod lora_linear;
pub(crate) mod quantized_gemm;
pub mod quantized_matmul;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swiglu;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Whether two tensors are views of one storage (a variable and the model's view of it).
pub fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    // Each guard is dropped before the next is taken: no lock is held twice.
    let pa: *const candle_core::Storage = &*a.storage_and_layout().0;
    let pb: *const candle_core::Storage = &*b.storage_and_layout().0;
    std::ptr::eq(pa, pb) && a.layout() == b.layout()
}

#[cfg(test)]
pub(crate) mod gradcheck;

pub use activation::activation;
pub use attention_probs::attention_probs;
pub use cross_entropy::cross_entropy;
pub use flash_attention::{flash_attention, flash_backward, flash_forward, FlashShape, Strided};
pub use frozen_matmul::linear;
pub use head_loss::lm_head_cross_entropy;
pub use layer_norm::layer_norm;
pub use lora_linear::lora_linear;
pub use quantized_matmul::quantized_linear;
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor, WithDType};
use num_traits::Float;

/// The element types our CPU kernels are written for.
pub(crate) trait Elem:
    Float
    + WithDType
    + Default
    + Send
    + Sync
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::DivAssign
    + std::ops::MulAssign
{
    /// `exp`, vectorizable in f32 (ops/fast_exp.rs); f64 keeps libm's for the reference tests.
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }

    /// libm's `exp`, bit for bit, with the arguments whose result rounds to zero answered
    /// without the call: masked attention scores sit there, and libm takes a slow underflow
    /// path for each of them (a tenth of a quantized prefill went to it).
    #[inline(always)]
    fn exp_or_zero(self) -> Self {
        if self < Self::EXP_IS_ZERO_BELOW {
            Self::zero()
        } else {
            self.exp()
        }
    }

    /// Below this, `exp` rounds to zero (under half the smallest subnormal).
    const EXP_IS_ZERO_BELOW: Self;
}
impl Elem for f32 {
    #[inline(always)]
    fn exp_fast(self) -> Self {
        fast_exp::exp(self)
    }

    // e^-104 = 6.8e-46, under 2^-150 = 7.0e-46.
    const EXP_IS_ZERO_BELOW: f32 = -104.0;
}
impl Elem for f64 {
    // e^-746 = 1.0e-324, under 2^-1075 = 2.5e-324.
    const EXP_IS_ZERO_BELOW: f64 = -746.0;
}

/// The sum of the squares of every entry of `t` (summed in its dtype), as f64.
pub(crate) fn sum_sq(t: &Tensor) -> Result<f64> {
    t.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

/// The Frobenius (L2) norm of `t` over every entry.
pub(crate) fn frobenius(t: &Tensor) -> Result<f64> {
    Ok(sum_sq(t)?.sqrt())
}

/// `out_t` [n, m] (one row per weight row, as the decoding kernels fill it so that each worker
/// writes one contiguous range) as [m, n].
pub(crate) fn rows_of_transposed(out_t: Vec<f32>, n: usize, m: usize) -> Vec<f32> {
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, v) in row.iter().enumerate() {
            out[i * n + j] = *v;
        }
    }
    out
}

/// Lanes of the reductions below: one accumulator is a chain of dependent adds (4 cycles
/// each); 16 independent ones the compiler keeps in vector registers.
const LANES: usize = 16;

/// `sum(x)`, vectorized; the order of the adds depends only on `x.len()`.
pub(crate) fn lane_sum<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(T::zero(), |a, b| a + *b);
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += *v;
        }
    }
    acc.iter().fold(tail, |a, b| a + *b)
}

/// `max(x)` (negative infinity for an empty slice), vectorized.
pub(crate) fn lane_max<T: Elem>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(T::neg_infinity(), |a, b| Float::max(a, *b));
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    acc.iter().fold(tail, |a, b| Float::max(a, *b))
}

/// The contiguous slice a storage/layout pair describes.
pub(crate) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!(
            "kernel input must be contiguous, got strides {:?}",
            l.stride()
        ),
    }
}

/// Runs `f` on the contiguous CPU data of each tensor (all contiguous, on the CPU, of type T).
pub(crate) fn with_slices<T: WithDType, R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in guards.iter() {
        match &**storage {
            Storage::Cpu(s) => slices.push(slice::<T>(s, layout)?),
            _ => candle_core::bail!("expected a CPU tensor"),
        }
    }
    f(&slices)
}

/// A new untracked CPU tensor holding `data`.
pub(crate) fn cpu_tensor<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// Elements (not rows) below which threading costs more than it saves.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 14;

/// Applies `f(row_index, out_row)` to each `width`-long row of `out` (the last may be shorter),
/// in parallel when large. The rows go to candle's barrier pool, the same threads as the
/// matmuls: on rayon's pool, the barrier pool's worker kept spinning for its next product
/// beside two rayon threads on two cores (9% of a quantized prefill). `f` must not itself use
/// the barrier pool (a nested call from the calling thread would wait on the pool's lock).
pub(crate) fn for_each_row<T: Send>(
    out: &mut [T],
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_mut(width).enumerate().for_each(|(i, r)| f(i, r));
        return;
    }
    let (len, addr) = (out.len(), out.as_mut_ptr() as usize);
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(width), |rows| {
        for i in rows {
            let start = i * width;
            // SAFETY: row i covers [start, start + width) clipped to the buffer, and each row
            // index is handed to exactly one worker, so the slices never overlap.
            let row = unsafe {
                std::slice::from_raw_parts_mut((addr as *mut T).add(start), width.min(len - start))
            };
            f(i, row);
        }
    });
}

/// Whether the op runs on our CPU kernels: CPU tensors in f32/f64.
pub(crate) fn use_cpu_kernel(t: &Tensor) -> bool {
    use_cpu_kernel_dtype(t.dtype(), t.device())
}

pub(crate) fn use_cpu_kernel_dtype(dtype: candle_core::DType, dev: &candle_core::Device) -> bool {
    #[cfg(test)]
    if device_path::forced() {
        return false;
    }
    dev.is_cpu() && matches!(dtype, candle_core::DType::F32 | candle_core::DType::F64)
}

pub(crate) fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Dispatches a CPU storage to a kernel generic over the element type.
macro_rules! dispatch_float {
    ($s:expr, $name:literal, |$v:ident : $t:ident| $body:expr) => {
        match $s {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                #[allow(clippy::redundant_locals)]
                let $v = $s;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                #[allow(clippy::redundant_locals)]
                let $v = $s;
                $body
            }
            other => candle_core::bail!(
                "{}: unsupported dtype {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch_float;

/// Runs a kernel body with `$t` bound to the element type of a float dtype.
macro_rules! by_dtype {
    ($dtype:expr, $name:literal, |$t:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {:?}", $name, other),
        }
    };
}
pub(crate) use by_dtype;

/// A new buffer of n values filled in parallel blocks when large: `f(first, out)` fills one
/// block, `first` being the index of its first value. Callers loop over the block's slices of
/// their inputs (`zip(&x[first..])`), which the compiler vectorizes; indexing each input per
/// element (`x[first + j]`) keeps a bounds check in the loop and left SwiGLU's forward scalar,
/// a tenth of a quantized prefill.
pub(crate) fn par_fill<T: Send + Copy + Default>(
    n: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let mut out = vec![T::default(); n];
    let block = 4096;
    for_each_row(&mut out, block, |bi, o| f(bi * block, o));
    out
}

/// Runs the path a GPU takes (every op's composed fallback) on CPU tensors, so tests can
/// check it where no GPU exists. Per thread: tests run side by side.
#[cfg(test)]
pub(crate) mod device_path {
    use std::cell::Cell;

    thread_local!(static FORCED: Cell<bool> = const { Cell::new(false) });

    pub(crate) fn forced() -> bool {
        FORCED.with(Cell::get)
    }

    /// `f()` with every op dispatched as off the CPU.
    pub(crate) fn run<R>(f: impl FnOnce() -> R) -> R {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                FORCED.with(|c| c.set(self.0));
            }
        }
        let _reset = Reset(FORCED.with(|c| c.replace(true)));
        f()
    }
}

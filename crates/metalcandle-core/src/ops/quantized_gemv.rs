//! `x @ W^T` for q4_0 and q8_0 weights and a few rows of x: the decoding step, where every
//! weight is read once per token. candle's kernel for these formats computes one dot product
//! at a time through layers of calls, each a chain of dependent FMAs, which left a decode
//! step compute-bound at a fraction of the memory read rate. This one quantizes x to 8 bits
//! per block of 32 (as candle and ggml do, so the integer products are the same) and reads
//! each weight row front to back.
//!
//! q4_0 nibbles are unsigned (0..15, the stored value is q - 8), so the products are taken on
//! the unsigned nibbles with `maddubs` and the offset is removed once per block through the
//! block's activation sum.
//!
//! On CPUs with VNNI, candle repacks q8_0 weights with 256-aligned inputs for a kernel that
//! beats this one while the weight sits in cache; in a whole decoding step, with the weights
//! streamed from memory, this one was faster there too (q8_0 Qwen2.5-0.5B shape: 43.9 against
//! 39.4 tokens/s), so it takes every q8_0 shape.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;

/// Above this many rows of x, the tiled matmul (quantized_gemm) reuses each weight block better.
pub(crate) const MAX_ROWS: usize = 8;

pub(super) const QK: usize = 32;

/// `Some(x @ W^T)` as [m, n] when this kernel applies (a CPU q4_0 or q8_0 weight, at most
/// `MAX_ROWS` rows, AVX2 and FMA available), `None` to let candle's kernel run.
pub(crate) fn try_forward(w: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    if m == 0 || m > MAX_ROWS || !simd::available() {
        return Ok(None);
    }
    let Some(wb) = WeightBytes::of(w, x, m)? else {
        return Ok(None);
    };
    let act = Activations::quantize(x, m, wb.k);
    Ok(Some(simd::gemv(
        wb.format,
        &wb.data,
        wb.row_bytes,
        wb.n,
        &act,
    )))
}

/// The raw blocks of a CPU q4_0 or q8_0 weight [n, k] whose rows `x` (m rows) can multiply.
pub(super) struct WeightBytes<'a> {
    pub(super) format: Format,
    pub(super) data: std::borrow::Cow<'a, [u8]>,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) row_bytes: usize,
}

impl<'a> WeightBytes<'a> {
    /// None when the weight is in another format, off the CPU, or not a whole number of
    /// blocks per row; an error when its storage does not hold its shape.
    pub(super) fn of(w: &'a QTensor, x: &[f32], m: usize) -> Result<Option<Self>> {
        let format = match w.dtype() {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return Ok(None),
        };
        if !w.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        if k % QK != 0 || x.len() != m * k {
            return Ok(None);
        }
        let data = w.data()?;
        let row_bytes = k / QK * format.block_bytes();
        if data.len() != n * row_bytes {
            candle_core::bail!(
                "quantized matmul: {:?} weight of shape [{n}, {k}] holds {} bytes, expected {}",
                w.dtype(),
                data.len(),
                n * row_bytes
            );
        }
        Ok(Some(WeightBytes {
            format,
            data,
            n,
            k,
            row_bytes,
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Format {
    /// f16 scale, then 16 bytes of two 4-bit values each (low nibbles are elements 0..16).
    Q4_0,
    /// f16 scale, then 32 signed bytes.
    Q8_0,
}

impl Format {
    pub(super) fn block_bytes(self) -> usize {
        match self {
            Format::Q4_0 => 2 + QK / 2,
            Format::Q8_0 => 2 + QK,
        }
    }
}

/// x in ggml's q8_0 form: per block of 32, `d = max|x| / 127` (kept at f16 precision, as the
/// stored block would be) and `round(x / d)`, plus `8 d sum(q)` for the q4_0 offset.
/// One block of 32 activations in ggml's q8_0 form, into `q`: returns the scale (at f16
/// precision) and the sum of the quantized values.
pub(super) fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(xs) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (half::f16::from_f32(scale).to_f32(), sum)
}

struct Activations {
    m: usize,
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    offset: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let blocks = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = vec![0f32; m * blocks];
        let mut offset = vec![0f32; m * blocks];
        for (b, (xs, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
            let (scale, sum) = quantize_block(xs, q);
            d[b] = scale;
            offset[b] = 8.0 * scale * sum as f32;
        }
        Activations {
            m,
            blocks,
            qs,
            d,
            offset,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Activations, Format, QK};
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// Fills [m, n]. The work runs on candle's barrier pool, whose workers spin between the
    /// many small ops of a decoding step; waking sleeping threads for each of a step's ~170
    /// products cost more than a tenth of the step.
    pub(super) fn gemv(
        f: Format,
        w: &[u8],
        row_bytes: usize,
        n: usize,
        a: &Activations,
    ) -> Vec<f32> {
        let m = a.m;
        let mut out_t = vec![0f32; n * m];
        let out_addr = out_t.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(n, |rows| {
            let (first, last) = (rows.start, rows.end);
            // SAFETY: each range of rows is handed to one worker, so the [first, last) rows of
            // the transposed result are written by that worker alone.
            let out = unsafe {
                std::slice::from_raw_parts_mut(
                    (out_addr as *mut f32).add(first * m),
                    (last - first) * m,
                )
            };
            // SAFETY: `available()` checked AVX2 and FMA.
            unsafe {
                rows_block(
                    f,
                    &w[first * row_bytes..last * row_bytes],
                    row_bytes,
                    a,
                    out,
                )
            }
        });
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

    /// Every activation row against each of `w`'s rows; `out` is [rows, m]. One weight row
    /// at a time, front to back, so the weights are read as a single sequential stream (rows
    /// are short, 504 bytes for q4_0 at k = 896: interleaving several rows' blocks leaves the
    /// hardware prefetcher behind and cost a third of the speed).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_block(f: Format, w: &[u8], row_bytes: usize, a: &Activations, out: &mut [f32]) {
        for (row, out) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.m)) {
            for (i, o) in out.iter_mut().enumerate() {
                *o = match f {
                    Format::Q4_0 => dot_row::<true>(row, a, i),
                    Format::Q8_0 => dot_row::<false>(row, a, i),
                };
            }
        }
    }

    /// The dot product of activation row `i` with one weight row.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_row<const Q4: bool>(row: &[u8], a: &Activations, i: usize) -> f32 {
        let bb = if Q4 { Format::Q4_0 } else { Format::Q8_0 }.block_bytes();
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        let qs = a.qs.as_ptr().add(i * a.blocks * QK);
        let ad = a.d.as_ptr().add(i * a.blocks);
        let aoff = a.offset.as_ptr().add(i * a.blocks);
        let base = row.as_ptr();
        for b in 0..row.len() / bb {
            let block = base.add(b * bb);
            let y = _mm256_loadu_si256(qs.add(b * QK) as *const __m256i);
            let dw = half::f16::from_bits(u16::from_le_bytes([*block, *block.add(1)])).to_f32();
            let products = if Q4 {
                let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
                let nibbles =
                    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
                offset += dw * *aoff.add(b);
                _mm256_maddubs_epi16(nibbles, y)
            } else {
                // maddubs wants its first operand unsigned: |x| times y with x's sign.
                let xq = _mm256_loadu_si256(block.add(2) as *const __m256i);
                _mm256_maddubs_epi16(_mm256_sign_epi8(xq, xq), _mm256_sign_epi8(y, xq))
            };
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * *ad.add(b)), sums, acc);
        }
        hsum(acc) - offset
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{Activations, Format};

    pub(super) fn available() -> bool {
        false
    }

    pub(super) fn gemv(_: Format, _: &[u8], _: usize, _: usize, _: &Activations) -> Vec<f32> {
        unreachable!("gemv runs only where available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::rand_tensor;
    use candle_core::{DType, Device, Module, Tensor};

    /// Against candle's own quantized matmul: the same integer products, so only the order of
    /// the float sums differs. 37 rows split unevenly across the threads.
    #[test]
    fn matches_candles_quantized_matmul() {
        if !simd::available() {
            eprintln!("no AVX2/FMA on this CPU: the kernel never runs here");
            return;
        }
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            for m in [1, 3, MAX_ROWS] {
                let w = rand_tensor(&[37, 96], 7).to_dtype(DType::F32).unwrap();
                let q = QTensor::quantize(&w, dtype).unwrap();
                let x = rand_tensor(&[m, 96], 8).to_dtype(DType::F32).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let got = try_forward(&q, &xs, m).unwrap().expect("kernel applies");
                let got = Tensor::from_vec(got, (m, 37), &Device::Cpu).unwrap();
                let want = candle_core::quantized::QMatMul::from_qtensor(q)
                    .unwrap()
                    .forward(&x)
                    .unwrap();
                let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap();
                let rel = err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
                assert!(rel < 1e-5, "{dtype:?} m={m}: relative difference {rel}");
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = rand_tensor(&[8, 64], 1).to_dtype(DType::F32).unwrap();
        let x = vec![0.5f32; (MAX_ROWS + 1) * 64];
        let q4k = QTensor::quantize(
            &rand_tensor(&[8, 256], 1).to_dtype(DType::F32).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        assert!(try_forward(&q4k, &x[..256], 1).unwrap().is_none());
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        assert!(try_forward(&q, &x, MAX_ROWS + 1).unwrap().is_none());
    }
}

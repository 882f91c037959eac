//! `x @ W^T` for q4_0 and q8_0 weights and a few rows of x: the decoding step, where every
//! weight is read once per token. candle's kernel for these formats computes one dot product
//! at a time through layers of calls, each a chain of dependent FMAs, which left a decode
//! step compute-bound at a fraction of the memory read rate. This one quantizes x to 8 bits
//! per block of 32 (as candle and ggml do, so the integer products are the same) and reads
//! each weight row front to back.
//!
//! The integer products take unsigned weight bytes (`vpdpbusd` with VNNI, `maddubs` + `madd`
//! without): q4_0 nibbles are stored as q + 8 and, with VNNI, q8_0 bytes are flipped to
//! q + 128. Each 32-bit lane's sum starts from `-offset * (its four activation bytes)`,
//! computed once with the activations, so the offset comes off exactly inside the integer sum;
//! a per-block float correction was a chain of dependent FMAs that held the kernel back.
//!
//! On CPUs with VNNI, candle repacks q8_0 weights with 256-aligned inputs for a kernel that
//! beats this one while the weight sits in cache; in a whole decoding step, with the weights
//! streamed from memory, this one was faster there too (q8_0 Qwen2.5-0.5B shape: 43.9 against
//! 39.4 tokens/s), so it takes every q8_0 shape.

use super::int8_dot::{detect, Path};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Result;

/// Above this many rows of x, the tiled matmul (quantized_gemm) reuses each weight block better.
pub(crate) const MAX_ROWS: usize = 8;

pub(super) const QK: usize = 32;

/// `Some(x @ W^T)` as [m, n] when this kernel applies (a CPU q4_0 or q8_0 weight, at most
/// `MAX_ROWS` rows, AVX2, FMA and F16C available), `None` to let candle's kernel run.
pub(crate) fn try_forward(w: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let Some(path) = detect() else {
        return Ok(None);
    };
    if m == 0 || m > MAX_ROWS {
        return Ok(None);
    }
    let Some(wb) = WeightBytes::of(w, x, m)? else {
        return Ok(None);
    };
    Ok(Some(forward(path, &wb, x, m)))
}

fn forward(path: Path, wb: &WeightBytes, x: &[f32], m: usize) -> Vec<f32> {
    let act = Activations::quantize(x, m, wb.k, path.offset(wb.format));
    simd::gemv(path, wb.format, &wb.data, wb.row_bytes, wb.n, &act)
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
pub(crate) enum Format {
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

/// One block of 32 activations in ggml's q8_0 form, into `q`: returns the scale (at f16
/// precision, as the stored block would be) and the sum of the quantized values.
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

/// Lanes of a 256-bit register of 32-bit sums: lane j adds the products of bytes 4j..4j+4.
const LANES: usize = 8;

/// x in q8_0 blocks, with each block's scale and, per lane, the integer the lane's sum starts
/// from: `-offset * (x's four bytes in that lane)`, which takes the weights' offset off
/// exactly inside the integer sum (no float correction per block).
struct Activations {
    m: usize,
    blocks: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    start: Vec<i32>,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize, offset: i32) -> Self {
        let blocks = k / QK;
        let mut qs = vec![0i8; m * k];
        let mut d = vec![0f32; m * blocks];
        let mut start = vec![0i32; m * blocks * LANES];
        let lanes = start.chunks_exact_mut(LANES);
        for (((xs, q), d), start) in x
            .chunks_exact(QK)
            .zip(qs.chunks_exact_mut(QK))
            .zip(&mut d)
            .zip(lanes)
        {
            *d = quantize_block(xs, q).0;
            for (s, four) in start.iter_mut().zip(q.chunks_exact(4)) {
                *s = -offset * four.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        Activations {
            m,
            blocks,
            qs,
            d,
            start,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Activations, Format, Path, LANES, QK};
    use crate::ops::x86::hsum;
    use std::arch::x86_64::*;

    /// Fills [m, n]. The work runs on candle's barrier pool, whose workers spin between the
    /// many small ops of a decoding step; waking sleeping threads for each of a step's ~170
    /// products cost more than a tenth of the step.
    pub(super) fn gemv(
        path: Path,
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
            let w = &w[first * row_bytes..last * row_bytes];
            // SAFETY: detect() found AVX2, FMA and F16C, and VNNI for those paths.
            unsafe {
                match (path, f) {
                    (Path::Vnni, Format::Q4_0) => rows_vnni::<true>(w, row_bytes, a, out),
                    (Path::Vnni, Format::Q8_0) => rows_vnni::<false>(w, row_bytes, a, out),
                    (Path::AvxVnni, Format::Q4_0) => rows_avxvnni::<true>(w, row_bytes, a, out),
                    (Path::AvxVnni, Format::Q8_0) => rows_avxvnni::<false>(w, row_bytes, a, out),
                    (Path::Avx2, Format::Q4_0) => rows_avx2_unsigned(w, row_bytes, a, out),
                    (Path::Avx2, Format::Q8_0) => rows_avx2_signed(w, row_bytes, a, out),
                }
            }
        });
        crate::ops::rows_of_transposed(out_t, n, m)
    }

    /// Every activation row against each of `w`'s rows, `out` [rows, m]: one weight row at a
    /// time, front to back, so the weights are read as a single sequential stream (rows are
    /// short, 504 bytes for q4_0 at k = 896: interleaving several rows' blocks leaves the
    /// hardware prefetcher behind and cost a third of the speed). Per block: the weight bytes
    /// made unsigned (`$unsigned`), the lanes' integer sums from their starting values
    /// (`$dot`), then one conversion and one FMA with the two scales; blocks alternate
    /// between two float accumulators so the FMAs do not wait on each other.
    macro_rules! rows_kernel {
        ($name:ident, $features:literal, <$($q4:ident)?>, $q4e:expr,
         |$block:ident| $unsigned:expr, |$acc:ident, $w:ident, $y:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<$(const $q4: bool)?>(
                w: &[u8],
                row_bytes: usize,
                a: &Activations,
                out: &mut [f32],
            ) {
                let q4: bool = $q4e;
                let bb = if q4 { Format::Q4_0 } else { Format::Q8_0 }.block_bytes();
                for (row, out) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(a.m)) {
                    let base = row.as_ptr();
                    for (i, o) in out.iter_mut().enumerate() {
                        let qs = a.qs.as_ptr().add(i * a.blocks * QK);
                        let ad = a.d.as_ptr().add(i * a.blocks);
                        let starts = a.start.as_ptr().add(i * a.blocks * LANES);
                        let mut acc = [_mm256_setzero_ps(); 2];
                        for b in 0..a.blocks {
                            let $block = base.add(b * bb);
                            let $y = _mm256_loadu_si256(qs.add(b * QK) as *const __m256i);
                            let $acc = _mm256_loadu_si256(starts.add(b * LANES) as *const __m256i);
                            let $w = $unsigned;
                            let sums = _mm256_cvtepi32_ps($dot);
                            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                                u16::from_le_bytes([*$block, *$block.add(1)]) as i32,
                            )));
                            let scale = _mm256_set1_ps(dw * *ad.add(b));
                            acc[b & 1] = _mm256_fmadd_ps(scale, sums, acc[b & 1]);
                        }
                        *o = hsum(_mm256_add_ps(acc[0], acc[1]));
                    }
                }
            }
        };
    }

    /// q4_0's 32 nibbles as unsigned bytes (low nibbles are elements 0..16); q8_0's bytes
    /// flipped to q + 128.
    #[target_feature(enable = "avx2")]
    unsafe fn unsigned_bytes(block: *const u8, q4: bool) -> __m256i {
        if q4 {
            let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
            let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
            _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
        } else {
            let q = _mm256_loadu_si256(block.add(2) as *const __m256i);
            _mm256_xor_si256(q, _mm256_set1_epi8(-128))
        }
    }

    rows_kernel!(rows_vnni, "avx2,fma,f16c,avx512vnni,avx512vl", <Q4>, Q4,
        |block| unsigned_bytes(block, Q4),
        |acc, w, y| _mm256_dpbusd_epi32(acc, w, y));
    rows_kernel!(rows_avxvnni, "avx2,fma,f16c,avxvnni", <Q4>, Q4,
        |block| unsigned_bytes(block, Q4),
        |acc, w, y| _mm256_dpbusd_avx_epi32(acc, w, y));
    rows_kernel!(rows_avx2_unsigned, "avx2,fma,f16c", <>, true,
    |block| unsigned_bytes(block, true),
    |acc, w, y| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1))
    ));
    // Without VNNI, q8_0 multiplies |w| by y with w's sign (its starting values are zero).
    rows_kernel!(rows_avx2_signed, "avx2,fma,f16c", <>, false,
    |block| _mm256_loadu_si256(block.add(2) as *const __m256i),
    |acc, w, y| _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)),
            _mm256_set1_epi16(1)
        )
    ));
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{Activations, Format, Path};

    pub(super) fn gemv(
        _: Path,
        _: Format,
        _: &[u8],
        _: usize,
        _: usize,
        _: &Activations,
    ) -> Vec<f32> {
        unreachable!("detect() finds no path off x86")
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::testing::rand_tensor;
    use candle_core::DType;

    /// Against candle's own quantized matmul: the same integer products, so only the order of
    /// the float sums differs. An odd block count (the two accumulators) and an even one.
    #[test]
    fn matches_candles_quantized_matmul() {
        check_against_candle(forward, &[96, 128], &[1, 3, MAX_ROWS]);
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

    /// `forward` (this kernel's or quantized_gemm's) against candle's own quantized matmul, which
    /// also rounds x to q8_0 blocks and so forms the same integer products: only the order of the
    /// float sums differs (1e-5 of the output's range). Every path this CPU has, q4_0 and q8_0,
    /// 37 weight rows (split unevenly across threads and tiles), inputs of `ks` and `ms` rows.
    pub(in crate::ops) fn check_against_candle(
        forward: fn(Path, &WeightBytes, &[f32], usize) -> Vec<f32>,
        ks: &[usize],
        ms: &[usize],
    ) {
        use crate::testing::rand_tensor;
        use candle_core::quantized::QMatMul;
        use candle_core::{DType, Device, Module, Tensor};

        let paths = crate::ops::int8_dot::all_available();
        if paths.is_empty() {
            eprintln!("no AVX2/FMA/F16C on this CPU: the kernel never runs here");
            return;
        }
        for path in paths {
            for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
                for &k in ks {
                    for &m in ms {
                        let w = rand_tensor(&[37, k], 7).to_dtype(DType::F32).unwrap();
                        let q = QTensor::quantize(&w, dtype).unwrap();
                        let x = rand_tensor(&[m, k], 8).to_dtype(DType::F32).unwrap();
                        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        let wb = WeightBytes::of(&q, &xs, m).unwrap().unwrap();
                        let got = forward(path, &wb, &xs, m);
                        let got = Tensor::from_vec(got, (m, 37), &Device::Cpu).unwrap();
                        let want = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
                        let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
                        let scale = want.abs().unwrap().max_all().unwrap();
                        let rel =
                            err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
                        assert!(rel < 1e-5, "{path:?} {dtype:?} k={k} m={m}: rel diff {rel}");
                    }
                }
            }
        }
    }
}

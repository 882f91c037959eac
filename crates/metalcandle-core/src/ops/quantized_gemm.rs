//! `x @ W^T` for a q4_0 or q8_0 weight in the interleaved layout (interleaved_blocks.rs) and
//! any number of rows of x: one decoded token, a prefill, or a training batch on a quantized
//! base (QLoRA). As ggml does, x is quantized once to 8 bits per block of 32 (ggml's q8_0
//! rounding, so the integer products are those of the ggml reference; only the activations are
//! rounded, the weights are used exactly) and the products are integer dot products.
//!
//! Per group of eight weight rows and block, the rows' values are loaded once (q4_0: four
//! loads, each split into two registers of nibbles) and used for up to `C` activation rows:
//! per activation row, eight `vpdpbusd` (or `maddubs` + `madd` without VNNI) of a weight
//! register against four broadcast activation bytes leave each row's block product in its
//! lane, and one conversion and one FMA with the eight rows' scales times the activation's
//! scale add it to that row's float sum. A decoding step (one activation row) thus costs about
//! four instructions per 32 weights and streams each group's bytes front to back; a prefill
//! reuses each decoded weight register for eight activation rows.
//!
//! The multiply-adds take unsigned bytes on the weight side, so the weights enter with an
//! offset (q4_0 nibbles are q + 8; with VNNI q8_0 bytes are flipped to q + 128), and each
//! block's integer sum starts from `-offset * sum(block of x)`, which takes it off exactly.
//! Without VNNI, q8_0 multiplies |w| by x with w's sign instead, which cannot saturate.

use super::int8_dot::Path;
use super::interleaved_blocks::{Interleaved, LANES, QK};

/// Activation rows whose quantized blocks stay in a core's L2 cache while every weight group
/// of the core's share passes over them (64 rows of the MLP's 4864 inputs: 311 KB).
const ROWS_PER_PASS: usize = 64;

/// Up to this many rows (a decoding step, a small batch) the activations are rounded on the
/// calling thread: a few blocks cost less than handing them to the pool.
const SERIAL_ROWS: usize = 8;

/// `x @ W^T` as [m, n] (x is [m, k]).
pub(crate) fn forward(path: Path, w: &Interleaved, x: &[f32], m: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * w.k, "quantized matmul: input is not [m, k]");
    let a = Activations::quantize(x, m, w.k, path.offset(w.format));
    let n = w.n;
    let mut out = vec![0f32; m * n];
    let out_addr = out.as_mut_ptr() as usize;
    // On candle's barrier pool, whose workers spin between the many small ops of a forward
    // pass: waking sleeping threads for each of a decoding step's ~170 products cost more than
    // a tenth of the step.
    candle_core::utils::barrier_pool().execute_chunked(w.groups(), |groups| {
        for r0 in (0..m).step_by(ROWS_PER_PASS) {
            let r1 = m.min(r0 + ROWS_PER_PASS);
            for g in groups.clone() {
                // SAFETY: the path was detected on this CPU; each group's columns of `out` are
                // written by the one worker that holds the group.
                unsafe { simd::group(path, w, &a, g, r0..r1, out_addr as *mut f32) }
            }
        }
    });
    out
}

/// x in ggml's q8_0 form: per row and block, 32 signed bytes, the scale, and the integer the
/// block's sum starts from (`-offset * sum(block)`).
struct Activations {
    qs: Vec<i8>,
    d: Vec<f32>,
    start: Vec<i32>,
}

impl Activations {
    /// Row by row on candle's pool when there are many: at 256 rows of the MLP's 4864 inputs
    /// this rounding is a tenth of the product's time, too much to leave on one thread.
    fn quantize(x: &[f32], m: usize, k: usize, offset: i32) -> Self {
        let blocks = k / QK;
        let mut a = Activations {
            qs: vec![0i8; m * k],
            d: vec![0f32; m * blocks],
            start: vec![0i32; m * blocks],
        };
        let addrs = (
            a.qs.as_mut_ptr() as usize,
            a.d.as_mut_ptr() as usize,
            a.start.as_mut_ptr() as usize,
        );
        let rows = |range: std::ops::Range<usize>| {
            let (first, len) = (range.start * blocks, range.len() * blocks);
            // SAFETY: the ranges handed out are disjoint, and rows [start, end) own blocks
            // [start * blocks, end * blocks) of each buffer.
            let (qs, d, start) = unsafe {
                (
                    std::slice::from_raw_parts_mut((addrs.0 as *mut i8).add(first * QK), len * QK),
                    std::slice::from_raw_parts_mut((addrs.1 as *mut f32).add(first), len),
                    std::slice::from_raw_parts_mut((addrs.2 as *mut i32).add(first), len),
                )
            };
            let x = &x[first * QK..(first + len) * QK];
            for (((xs, q), d), start) in x
                .chunks_exact(QK)
                .zip(qs.chunks_exact_mut(QK))
                .zip(d)
                .zip(start)
            {
                // SAFETY: a path was detected, so the CPU has AVX2; both blocks hold 32 values.
                let (scale, sum) = unsafe { simd::quantize_block(xs.as_ptr(), q.as_mut_ptr()) };
                *d = scale;
                *start = -offset * sum;
            }
        };
        if m <= SERIAL_ROWS {
            rows(0..m);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(m, rows);
        }
        a
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Activations, Interleaved, Path, LANES, QK};
    use crate::ops::interleaved_blocks::Format;
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One block of 32 activations in ggml's q8_0 form, into `q`: returns the scale (at f16
    /// precision, as the stored block would be) and the sum of the quantized values. Rounded
    /// half away from zero, as ggml's reference rounds (its AVX2 code rounds ties to even;
    /// the two differ only on exact ties).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn quantize_block(xs: *const f32, q: *mut i8) -> (f32, i32) {
        let sign = _mm256_set1_ps(-0.0);
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs.add(8 * i)));
        let abs = |v| _mm256_andnot_ps(sign, v);
        let amax = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        let ints: [__m256i; 4] = std::array::from_fn(|i| {
            let x = _mm256_mul_ps(v[i], inv);
            let t = _mm256_round_ps(x, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            // x - t is exact, so this decides ties as `f32::round` does.
            let tie_or_more =
                _mm256_cmp_ps(abs(_mm256_sub_ps(x, t)), _mm256_set1_ps(0.5), _CMP_GE_OQ);
            let away = _mm256_or_ps(_mm256_and_ps(x, sign), _mm256_set1_ps(1.0));
            let r = _mm256_add_ps(t, _mm256_and_ps(tie_or_more, away));
            // Only a non-finite input leaves [-127, 127]; clamped (NaN to -127), its bytes and
            // the block's sum still agree, and the sum cannot overflow.
            let r = _mm256_min_ps(
                _mm256_max_ps(r, _mm256_set1_ps(-127.0)),
                _mm256_set1_ps(127.0),
            );
            _mm256_cvttps_epi32(r)
        });
        // The packs interleave 128-bit halves; the permutation puts the 32 bytes in order.
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(ints[0], ints[1]),
            _mm256_packs_epi32(ints[2], ints[3]),
        );
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(q as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, order));
        let s = _mm256_add_epi32(
            _mm256_add_epi32(ints[0], ints[1]),
            _mm256_add_epi32(ints[2], ints[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        (half::f16::from_f32(scale).to_f32(), _mm_cvtsi128_si32(s))
    }

    /// Weight group g against activation rows `rows`, into out [m, n].
    pub(super) unsafe fn group(
        path: Path,
        w: &Interleaved,
        a: &Activations,
        g: usize,
        rows: Range<usize>,
        out: *mut f32,
    ) {
        // Activation rows per pass over the group: with 32 registers (AVX-512) eight float
        // sums sit beside the eight weight registers, with 16 four.
        let most = match path {
            Path::Vnni => 8,
            Path::AvxVnni | Path::Avx2 => 4,
        };
        let mut c0 = rows.start;
        while c0 < rows.end {
            let c = most.min(rows.end - c0);
            let c = if c >= 8 {
                8
            } else if c >= 4 {
                4
            } else if c >= 2 {
                2
            } else {
                1
            };
            macro_rules! by_rows {
                ($kernel:ident) => {
                    match c {
                        8 => $kernel::<8>(w, a, g, c0, out),
                        4 => $kernel::<4>(w, a, g, c0, out),
                        2 => $kernel::<2>(w, a, g, c0, out),
                        _ => $kernel::<1>(w, a, g, c0, out),
                    }
                };
            }
            match (path, w.format) {
                (Path::Vnni, Format::Q4_0) => by_rows!(q4_vnni),
                (Path::Vnni, Format::Q8_0) => by_rows!(q8_vnni),
                (Path::AvxVnni, Format::Q4_0) => by_rows!(q4_avxvnni),
                (Path::AvxVnni, Format::Q8_0) => by_rows!(q8_avxvnni),
                (Path::Avx2, Format::Q4_0) => by_rows!(q4_avx2),
                (Path::Avx2, Format::Q8_0) => by_rows!(q8_avx2),
            }
            c0 += c;
        }
    }

    /// How far ahead of the block being multiplied the weight bytes are requested: the
    /// hardware prefetcher alone left a q4_0 decoding step at 117 tokens/s, 16 blocks of q4_0
    /// ahead (2 KB) gave 125, 4 KB 129 (Qwen2.5-0.5B shape, 2 threads).
    const PREFETCH_BYTES: usize = 4096;

    /// One group's block of q4_0 values: register i, lane j = row j's elements 4i..4i+4 as
    /// unsigned bytes (chunk i's low nibbles for i < 4, chunk i - 4's high nibbles after).
    #[target_feature(enable = "avx2")]
    unsafe fn q4_values(qs: *const u8) -> [__m256i; 8] {
        let low = _mm256_set1_epi8(0x0F);
        let mut v = [_mm256_setzero_si256(); 8];
        for i in 0..4 {
            let p = _mm256_loadu_si256(qs.add(32 * i) as *const __m256i);
            v[i] = _mm256_and_si256(p, low);
            v[4 + i] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
        }
        v
    }

    /// One group's block of q8_0 values, register i = chunk i; flipped to q + 128 for VNNI.
    #[target_feature(enable = "avx2")]
    unsafe fn q8_values<const FLIP: bool>(qs: *const u8) -> [__m256i; 8] {
        let mut v = [_mm256_setzero_si256(); 8];
        for (i, v) in v.iter_mut().enumerate() {
            let q = _mm256_loadu_si256(qs.add(32 * i) as *const __m256i);
            *v = if FLIP {
                _mm256_xor_si256(q, _mm256_set1_epi8(-128))
            } else {
                q
            };
        }
        v
    }

    /// C activation rows from c0 against group g; `$dot` adds the four products of each lane
    /// of a weight register and a broadcast activation group into `$acc`.
    macro_rules! kernel {
        ($name:ident, $features:literal, $values:expr, |$acc:ident, $w:ident, $x:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name<const C: usize>(
                w: &Interleaved,
                a: &Activations,
                g: usize,
                c0: usize,
                out: *mut f32,
            ) {
                let (blocks, chunk) = (w.blocks(), w.chunk_bytes());
                let qs = w.qs.as_ptr().add(g * blocks * chunk);
                let ds = w.d.as_ptr().add(g * blocks * LANES);
                let mut acc = [_mm256_setzero_ps(); C];
                for b in 0..blocks {
                    // The stream runs on into the next group; a prefetch past the end is
                    // harmless (it cannot fault), hence the wrapping address.
                    let ahead = qs.wrapping_add(b * chunk + PREFETCH_BYTES);
                    for line in (0..chunk).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
                    }
                    let values: [__m256i; 8] = $values(qs.add(b * chunk));
                    let dw = _mm256_cvtph_ps(_mm_loadu_si128(ds.add(b * LANES) as *const __m128i));
                    for (c, acc) in acc.iter_mut().enumerate() {
                        let at = (c0 + c) * blocks + b;
                        let xs = a.qs.as_ptr().add(at * QK) as *const i32;
                        let mut s = _mm256_set1_epi32(*a.start.as_ptr().add(at));
                        for (i, &$w) in values.iter().enumerate() {
                            let $x = _mm256_set1_epi32(xs.add(i).read_unaligned());
                            let $acc = s;
                            s = $dot;
                        }
                        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.as_ptr().add(at)));
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                    }
                }
                let (n, first) = (w.n, g * LANES);
                for (c, acc) in acc.iter().enumerate() {
                    let dst = out.add((c0 + c) * n + first);
                    if first + LANES <= n {
                        _mm256_storeu_ps(dst, *acc);
                    } else {
                        let mut lanes = [0f32; LANES];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                        std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, n - first);
                    }
                }
            }
        };
    }

    /// The q4_0 and q8_0 (flipped to q + 128) kernels of one unsigned-by-signed dot product.
    macro_rules! unsigned_kernels {
        ($q4:ident, $q8:ident, $features:literal, $dot:path) => {
            kernel!($q4, $features, q4_values, |acc, w, x| $dot(acc, w, x));
            kernel!($q8, $features, q8_values::<true>, |acc, w, x| $dot(
                acc, w, x
            ));
        };
    }
    unsigned_kernels!(
        q4_vnni,
        q8_vnni,
        "avx2,fma,f16c,avx512vnni,avx512vl",
        _mm256_dpbusd_epi32
    );
    unsigned_kernels!(
        q4_avxvnni,
        q8_avxvnni,
        "avx2,fma,f16c,avxvnni",
        _mm256_dpbusd_avx_epi32
    );
    kernel!(q4_avx2, "avx2,fma,f16c", q4_values, |acc, w, x| {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });
    kernel!(q8_avx2, "avx2,fma,f16c", q8_values::<false>, |acc, w, x| {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{Activations, Interleaved, Path};

    pub(super) unsafe fn quantize_block(_: *const f32, _: *mut i8) -> (f32, i32) {
        unreachable!("int8_dot::detect() finds no path off x86")
    }

    pub(super) unsafe fn group(
        _: Path,
        _: &Interleaved,
        _: &Activations,
        _: usize,
        _: std::ops::Range<usize>,
        _: *mut f32,
    ) {
        unreachable!("int8_dot::detect() finds no path off x86")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::interleaved_blocks::Format;
    use crate::testing::{max_rel_diff, rand_tensor};
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{DType, Device, Module, Tensor};

    /// ggml's reference rounding of one block, element by element.
    fn quantize_block_reference(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(xs) {
            *q = (v * inv).round() as i8;
        }
        let sum = q.iter().map(|&v| v as i32).sum();
        (half::f16::from_f32(scale).to_f32(), sum)
    }

    /// Against the element-by-element rounding: random blocks, blocks with exact ties
    /// (amax 127 makes the scale 1), a zero block.
    #[test]
    fn blocks_round_as_ggmls_reference_does() {
        if crate::ops::int8_dot::detect().is_none() {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = (0..200)
            .map(|i| {
                crate::testing::uniform(QK, i)
                    .iter()
                    .map(|&v| (v * 7.0) as f32)
                    .collect()
            })
            .collect();
        blocks.push(
            (0..QK)
                .map(|i| if i == 0 { 127.0 } else { i as f32 - 16.5 })
                .collect(),
        );
        blocks.push(vec![0.0; QK]);
        for xs in blocks {
            let (mut got, mut want) = ([0i8; QK], [0i8; QK]);
            let ours = unsafe { simd::quantize_block(xs.as_ptr(), got.as_mut_ptr()) };
            assert_eq!(ours, quantize_block_reference(&xs, &mut want), "{xs:?}");
            assert_eq!(got, want, "{xs:?}");
        }
    }

    /// Against candle's own quantized matmul, which also rounds x to q8_0 blocks and so forms
    /// the same integer products: only the order of the float sums differs (1e-5 of the
    /// output's range). Every path this CPU has, both formats, 37 weight rows (a padded group,
    /// split unevenly across threads), odd and even block counts, and row counts that take
    /// every tile size and more than one pass.
    /// Non-finite activations give garbage, but bytes and sum that agree and no overflow.
    #[test]
    fn non_finite_blocks_keep_bytes_and_sum_consistent() {
        if crate::ops::int8_dot::detect().is_none() {
            return;
        }
        let mut xs = [0.25f32; QK];
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            xs[3] = bad;
            let mut q = [0i8; QK];
            let (_, sum) = unsafe { simd::quantize_block(xs.as_ptr(), q.as_mut_ptr()) };
            assert_eq!(sum, q.iter().map(|&v| v as i32).sum::<i32>(), "{bad}");
        }
    }

    #[test]
    fn matches_candles_quantized_matmul() {
        let paths = crate::ops::int8_dot::all_available();
        if paths.is_empty() {
            eprintln!("no AVX2/FMA/F16C on this CPU: the kernel never runs here");
            return;
        }
        for path in paths {
            for format in [Format::Q4_0, Format::Q8_0] {
                for k in [96, 256] {
                    for m in [1, 3, 7, 8, 15, 70] {
                        let w = rand_tensor(&[37, k], 7).to_dtype(DType::F32).unwrap();
                        let q = QTensor::quantize(&w, format.dtype()).unwrap();
                        let il = Interleaved::pack(format, 37, k, &q.data().unwrap()).unwrap();
                        let x = rand_tensor(&[m, k], 8).to_dtype(DType::F32).unwrap();
                        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        let got = forward(path, &il, &xs, m);
                        let got = Tensor::from_vec(got, (m, 37), &Device::Cpu).unwrap();
                        let want = QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
                        let rel = max_rel_diff(&got, &want);
                        assert!(
                            rel < 1e-5,
                            "{path:?} {format:?} k={k} m={m}: rel diff {rel}"
                        );
                    }
                }
            }
        }
    }

    /// Against the float product with the dequantized weight: the activations' 8-bit rounding
    /// moves each term by at most |x| |w| / 254, far below 1% of the output's range here.
    #[test]
    fn close_to_the_dequantized_float_product() {
        let Some(path) = crate::ops::int8_dot::detect() else {
            eprintln!("no AVX2/FMA/F16C on this CPU: the kernel never runs here");
            return;
        };
        for format in [Format::Q4_0, Format::Q8_0] {
            let w = rand_tensor(&[64, 512], 3).to_dtype(DType::F32).unwrap();
            let q = QTensor::quantize(&w, format.dtype()).unwrap();
            let il = Interleaved::pack(format, 64, 512, &q.data().unwrap()).unwrap();
            let x = rand_tensor(&[40, 512], 4).to_dtype(DType::F32).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = Tensor::from_vec(forward(path, &il, &xs, 40), (40, 64), &Device::Cpu);
            let wd = q.dequantize(&Device::Cpu).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let rel = max_rel_diff(&got.unwrap(), &want);
            assert!(rel < 1e-2, "{format:?}: relative error {rel}");
        }
    }
}

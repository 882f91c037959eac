//! `x @ W^T` for q4_0 and q8_0 weights and many rows of x: prefill, batched forward and the
//! training-time forward on a quantized base. As ggml does, x is quantized once to 8 bits per
//! block of 32 (the same rounding as the decoding kernel, so the integer products are those
//! of the ggml reference; only the activations are rounded, the weights are used exactly) and
//! the products are integer dot products.
//!
//! The work is tiled: `R` weight rows against `C` activation rows at a time, so each weight
//! block loaded is used `C` times and each activation block `R` times. Within a tile, eight
//! consecutive blocks are interleaved by 4-byte groups (group i of block j at slot 8 i + j),
//! so that one 256-bit integer multiply-add (`vpdpbusd` with VNNI, `maddubs` + `madd`
//! without) adds a group of four products into lane j: after eight of them lane j holds block
//! j's whole dot product, and one conversion and one FMA apply the eight blocks' scales. The
//! plain layout would need those two per block. The weights are repacked tile by tile (an 8x8
//! transpose of 32-bit groups, about 1% of the arithmetic at 256 rows), so no second copy of
//! the model is kept.
//!
//! The multiply-adds take unsigned bytes on one side, so the weights enter with an offset
//! (q4_0 nibbles are stored as q + 8; with VNNI q8_0 bytes are shifted by 128), and the
//! integer accumulators start from `-offset * sum(block of x)` to take it off exactly. Without
//! VNNI, q8_0 uses `maddubs` on |w| and x with w's sign instead, which cannot saturate.

use super::int8_dot::{detect, Path};
use super::quantized_gemv::{quantize_block, Format, WeightBytes, QK};
use candle_core::quantized::QTensor;
use candle_core::Result;

/// Blocks interleaved per group: one 256-bit register holds a 4-byte group of each.
const G: usize = 8;
/// Values per interleaved group of blocks.
const GV: usize = G * QK;
/// Activation rows per tile (both paths).
const C: usize = 4;

/// `Some(x @ W^T)` as [m, n] for a CPU q4_0 or q8_0 weight on a CPU with AVX2, FMA and F16C;
/// `None` to let candle's kernel run.
pub(crate) fn try_forward(w: &QTensor, x: &[f32], m: usize) -> Result<Option<Vec<f32>>> {
    let Some(path) = detect() else {
        return Ok(None);
    };
    if m == 0 {
        return Ok(None);
    }
    let Some(wb) = WeightBytes::of(w, x, m)? else {
        return Ok(None);
    };
    Ok(Some(forward(path, &wb, x, m)))
}

fn forward(path: Path, wb: &WeightBytes, x: &[f32], m: usize) -> Vec<f32> {
    let act = Packed::quantize(x, m, wb.k, path.offset(wb.format));
    simd::gemm(path, wb, &act)
}

/// x quantized and interleaved: per row (padded with zero rows to a multiple of `C`) and per
/// group of `G` blocks (padded with zero blocks), `GV` values, `G` scales and `G` integer
/// starting values `-offset * sum(block)`.
struct Packed {
    m: usize,
    rows: usize,
    groups: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    start: Vec<i32>,
}

impl Packed {
    /// Row by row on candle's pool: at 256 rows of the MLP's 4864 inputs this rounding is a
    /// tenth of the product's time, too much to leave on one thread.
    fn quantize(x: &[f32], m: usize, k: usize, offset: i32) -> Self {
        let blocks = k / QK;
        let groups = blocks.div_ceil(G);
        let rows = m.div_ceil(C) * C;
        let mut qs = vec![0i8; rows * groups * GV];
        let mut d = vec![0f32; rows * groups * G];
        let mut start = vec![0i32; rows * groups * G];
        let (qs_addr, d_addr, start_addr) = (
            qs.as_mut_ptr() as usize,
            d.as_mut_ptr() as usize,
            start.as_mut_ptr() as usize,
        );
        candle_core::utils::barrier_pool().execute_chunked(m, |range| {
            // SAFETY: row r writes only its own groups [r * groups, (r + 1) * groups) of each
            // buffer, and each row is handed to one worker.
            let (qs, d, start) = unsafe {
                let first = range.start * groups;
                let len = range.len() * groups;
                (
                    std::slice::from_raw_parts_mut((qs_addr as *mut i8).add(first * GV), len * GV),
                    std::slice::from_raw_parts_mut((d_addr as *mut f32).add(first * G), len * G),
                    std::slice::from_raw_parts_mut(
                        (start_addr as *mut i32).add(first * G),
                        len * G,
                    ),
                )
            };
            let mut block = [0i8; QK];
            for (r, xr) in x[range.start * k..range.end * k]
                .chunks_exact(k)
                .enumerate()
            {
                for (b, xs) in xr.chunks_exact(QK).enumerate() {
                    let (scale, sum) = quantize_block(xs, &mut block);
                    let (g, j) = (r * groups + b / G, b % G);
                    d[g * G + j] = scale;
                    start[g * G + j] = -offset * sum;
                    let dst = &mut qs[g * GV..(g + 1) * GV];
                    for (i, four) in block.chunks_exact(4).enumerate() {
                        dst[(i * G + j) * 4..(i * G + j) * 4 + 4].copy_from_slice(four);
                    }
                }
            }
        });
        Packed {
            m,
            rows,
            groups,
            qs,
            d,
            start,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Format, Packed, Path, WeightBytes, C, G, GV, QK};
    use crate::ops::x86::hsum;
    use std::arch::x86_64::*;

    /// Weight rows per tile: with 32 registers (AVX-512) 4, else 2.
    fn rows(path: Path) -> usize {
        match path {
            Path::Vnni => 4,
            Path::AvxVnni | Path::Avx2 => 2,
        }
    }

    /// Weight rows of one tile, repacked like the activations: per row and group, `GV` bytes
    /// and `G` scales (zero for padding blocks and rows).
    struct Tile {
        w: Vec<u8>,
        d: Vec<f32>,
    }

    /// Fills [m, n], the weight rows split in tiles across candle's pool (whose workers are
    /// already spinning between the ops of a forward pass).
    pub(super) fn gemm(path: Path, wb: &WeightBytes, a: &Packed) -> Vec<f32> {
        let (n, r) = (wb.n, rows(path));
        let mut out = vec![0f32; a.m * n];
        let out_addr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(r), |tiles| {
            let mut tile = Tile {
                w: vec![0u8; r * a.groups * GV],
                d: vec![0f32; r * a.groups * G],
            };
            for t in tiles {
                let first = t * r;
                let count = r.min(n - first);
                // SAFETY: detect() found AVX2, FMA and F16C (and VNNI for those paths); each
                // tile's columns of `out` are written by the one worker that holds the tile.
                unsafe {
                    pack(path, wb, first, count, a.groups, &mut tile);
                    let out = out_addr as *mut f32;
                    match path {
                        Path::Vnni => tile_vnni(&tile, a, out, n, first, count),
                        Path::AvxVnni => tile_avxvnni(&tile, a, out, n, first, count),
                        Path::Avx2 => match wb.format {
                            Format::Q4_0 => tile_avx2_unsigned(&tile, a, out, n, first, count),
                            Format::Q8_0 => tile_avx2_signed(&tile, a, out, n, first, count),
                        },
                    }
                }
            }
        });
        out
    }

    /// Rows `first..first + count` of the weight into `tile` (rows past `count` zeroed).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pack(
        path: Path,
        wb: &WeightBytes,
        first: usize,
        count: usize,
        groups: usize,
        tile: &mut Tile,
    ) {
        let bb = wb.format.block_bytes();
        let blocks = wb.k / QK;
        let flip = path.offset(wb.format) == 128;
        let low = _mm256_set1_epi8(0x0F);
        let high_bit = _mm256_set1_epi8(-128);
        tile.w.fill(0);
        tile.d.fill(0.0);
        for r in 0..count {
            let row = wb.data.as_ptr().add((first + r) * wb.row_bytes);
            for g in 0..groups {
                let mut v = [_mm256_setzero_si256(); G];
                let mut scales = [0u16; G];
                for (j, (v, s)) in v.iter_mut().zip(scales.iter_mut()).enumerate() {
                    let b = g * G + j;
                    if b >= blocks {
                        break;
                    }
                    let block = row.add(b * bb);
                    *s = u16::from_le_bytes([*block, *block.add(1)]);
                    *v = match wb.format {
                        Format::Q4_0 => {
                            let packed = _mm_loadu_si128(block.add(2) as *const __m128i);
                            let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
                            _mm256_and_si256(both, low)
                        }
                        Format::Q8_0 => {
                            let q = _mm256_loadu_si256(block.add(2) as *const __m256i);
                            if flip {
                                _mm256_xor_si256(q, high_bit)
                            } else {
                                q
                            }
                        }
                    };
                }
                let dst = tile.w.as_mut_ptr().add((r * groups + g) * GV) as *mut __m256i;
                for (i, u) in transpose(v).iter().enumerate() {
                    _mm256_storeu_si256(dst.add(i), *u);
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.as_ptr() as *const __m128i));
                _mm256_storeu_ps(tile.d.as_mut_ptr().add((r * groups + g) * G), d);
            }
        }
    }

    /// Lane i of the result j is lane j of input i (32-bit lanes).
    #[target_feature(enable = "avx2")]
    unsafe fn transpose(v: [__m256i; G]) -> [__m256i; G] {
        let t = |a, b| (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let (t0, t1) = t(v[0], v[1]);
        let (t2, t3) = t(v[2], v[3]);
        let (t4, t5) = t(v[4], v[5]);
        let (t6, t7) = t(v[6], v[7]);
        let s = |a, b| (_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        let (s0, s1) = s(t0, t2);
        let (s2, s3) = s(t1, t3);
        let (s4, s5) = s(t4, t6);
        let (s6, s7) = s(t5, t7);
        [
            _mm256_permute2x128_si256(s0, s4, 0x20),
            _mm256_permute2x128_si256(s1, s5, 0x20),
            _mm256_permute2x128_si256(s2, s6, 0x20),
            _mm256_permute2x128_si256(s3, s7, 0x20),
            _mm256_permute2x128_si256(s0, s4, 0x31),
            _mm256_permute2x128_si256(s1, s5, 0x31),
            _mm256_permute2x128_si256(s2, s6, 0x31),
            _mm256_permute2x128_si256(s3, s7, 0x31),
        ]
    }

    /// One tile of R weight rows against every activation row, C rows at a time; `$dot` adds
    /// the products of one interleaved register of weights and activations into `$acc`.
    macro_rules! tile_kernel {
        ($name:ident, $features:literal, $r:expr, |$acc:ident, $w:ident, $y:ident| $dot:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(
                t: &Tile,
                a: &Packed,
                out: *mut f32,
                n: usize,
                first: usize,
                count: usize,
            ) {
                const R: usize = $r;
                let groups = a.groups;
                let w = t.w.as_ptr() as *const __m256i;
                for c0 in (0..a.rows).step_by(C) {
                    let mut acc = [[_mm256_setzero_ps(); C]; R];
                    for g in 0..groups {
                        for c in 0..C {
                            let ag = (c0 + c) * groups + g;
                            let ys = a.qs.as_ptr().add(ag * GV) as *const __m256i;
                            let start = _mm256_loadu_si256(a.start.as_ptr().add(ag * G) as _);
                            let mut s = [start; R];
                            for i in 0..G {
                                let $y = _mm256_loadu_si256(ys.add(i));
                                for (r, s) in s.iter_mut().enumerate() {
                                    let $w = _mm256_loadu_si256(w.add((r * groups + g) * G + i));
                                    let $acc = *s;
                                    *s = $dot;
                                }
                            }
                            let dx = _mm256_loadu_ps(a.d.as_ptr().add(ag * G));
                            for (r, s) in s.iter().enumerate() {
                                let dw = _mm256_loadu_ps(t.d.as_ptr().add((r * groups + g) * G));
                                let scale = _mm256_mul_ps(dw, dx);
                                acc[r][c] =
                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), scale, acc[r][c]);
                            }
                        }
                    }
                    for c in 0..C.min(a.m.saturating_sub(c0)) {
                        for (r, acc) in acc.iter().enumerate().take(count) {
                            *out.add((c0 + c) * n + first + r) = hsum(acc[c]);
                        }
                    }
                }
            }
        };
    }

    tile_kernel!(tile_vnni, "avx2,fma,avx512vnni,avx512vl", 4, |acc, w, y| {
        _mm256_dpbusd_epi32(acc, w, y)
    });
    tile_kernel!(tile_avxvnni, "avx2,fma,avxvnni", 2, |acc, w, y| {
        _mm256_dpbusd_avx_epi32(acc, w, y)
    });
    tile_kernel!(tile_avx2_unsigned, "avx2,fma", 2, |acc, w, y| {
        let pairs = _mm256_maddubs_epi16(w, y);
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });
    tile_kernel!(tile_avx2_signed, "avx2,fma", 2, |acc, w, y| {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    });
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use super::{Packed, Path, WeightBytes};

    pub(super) fn gemm(_: Path, _: &WeightBytes, _: &Packed) -> Vec<f32> {
        unreachable!("detect() finds no path off x86")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::rand_tensor;
    use candle_core::quantized::GgmlDType;
    use candle_core::{DType, Device, Tensor};

    /// Inputs of 3, 8 and 10 blocks (padded groups and a whole one), row counts around the
    /// tile of 4.
    #[test]
    fn matches_candles_quantized_matmul() {
        crate::ops::quantized_gemv::tests::check_against_candle(
            forward,
            &[96, 256, 320],
            &[1, 9, 14, 33],
        );
    }

    /// Against the float product with the dequantized weight: the activations' 8-bit rounding
    /// moves each term by at most |x| |w| / 254, far below 1% of the output's range here.
    #[test]
    fn close_to_the_dequantized_float_product() {
        if detect().is_none() {
            eprintln!("no AVX2/FMA/F16C on this CPU: the kernel never runs here");
            return;
        }
        for dtype in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let w = rand_tensor(&[64, 512], 3).to_dtype(DType::F32).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let x = rand_tensor(&[40, 512], 4).to_dtype(DType::F32).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = try_forward(&q, &xs, 40).unwrap().expect("kernel applies");
            let got = Tensor::from_vec(got, (40, 64), &Device::Cpu).unwrap();
            let wd = q.dequantize(&Device::Cpu).unwrap();
            let want = x.matmul(&wd.t().unwrap()).unwrap();
            let err = (&got - &want).unwrap().abs().unwrap().max_all().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap();
            let rel = err.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
            assert!(rel < 1e-2, "{dtype:?}: relative error {rel}");
        }
    }

    #[test]
    fn declines_other_formats() {
        let q4k = QTensor::quantize(
            &rand_tensor(&[8, 256], 1).to_dtype(DType::F32).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        assert!(try_forward(&q4k, &[0.5; 16 * 256], 16).unwrap().is_none());
    }
}

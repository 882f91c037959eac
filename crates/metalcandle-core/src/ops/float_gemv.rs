//! `x @ W^T` for a float32 weight [n, k] and a few rows of x: the decoding step, where every
//! weight is read once per token, so the product can go no faster than the memory read rate.
//! gemm's kernels pack their operands for reuse that one row of x cannot give, and for one
//! row reached about 60% of the read rate in a float32 decoding step (Qwen2.5-0.5B shape).
//! This one reads each weight row front to back, once, against every row of x, with two
//! independent accumulators per row of x to hide the FMA latency; each output is one
//! worker's sum in a fixed order, so the result does not depend on the thread count.

use candle_core::utils::barrier_pool;

/// Above this many rows of x, gemm's tiling reuses each weight load better.
pub(crate) const MAX_ROWS: usize = 8;

/// `Some(x @ W^T)` as [m, n] for x [m, k] and W [n, k] (both row-major), when this kernel
/// applies (1..=`MAX_ROWS` rows, AVX2 and FMA); `None` to let gemm run.
pub(crate) fn try_forward(w: &[f32], n: usize, k: usize, x: &[f32], m: usize) -> Option<Vec<f32>> {
    if m == 0 || m > MAX_ROWS || k == 0 || !simd::available() {
        return None;
    }
    debug_assert_eq!(w.len(), n * k);
    debug_assert_eq!(x.len(), m * k);
    let mut out_t = vec![0f32; n * m];
    let out_addr = out_t.as_mut_ptr() as usize;
    // candle's barrier pool: its workers spin between the small ops of a decoding step, where
    // waking sleeping threads for each product cost more than a tenth of the step.
    barrier_pool().execute_chunked(n, |rows| {
        for j in rows {
            // SAFETY: each output row j of the transposed result is written by the one worker
            // that holds j; `available()` checked AVX2 and FMA.
            unsafe {
                let out = (out_addr as *mut f32).add(j * m);
                simd::row_dots(&w[j * k..(j + 1) * k], x, m, out);
            }
        }
    });
    Some(super::rows_of_transposed(out_t, n, m))
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use crate::ops::x86::hsum;
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `out[i] = w . x[i]` for the m rows of x (each `w.len()` long), up to four rows per pass
    /// over w so the accumulators stay in registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dots(w: &[f32], x: &[f32], m: usize, out: *mut f32) {
        let k = w.len();
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            let xs = x.as_ptr().add(i * k);
            let o = out.add(i);
            match rows {
                4 => dots::<4>(w, xs, k, o),
                3 => dots::<3>(w, xs, k, o),
                2 => dots::<2>(w, xs, k, o),
                _ => dots::<1>(w, xs, k, o),
            }
            i += rows;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dots<const M: usize>(w: &[f32], x: *const f32, k: usize, out: *mut f32) {
        let wp = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let mut p = 0;
        while p + 16 <= k {
            let w0 = _mm256_loadu_ps(wp.add(p));
            let w1 = _mm256_loadu_ps(wp.add(p + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let xr = x.add(r * k + p);
                acc[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[0]);
                acc[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc[1]);
            }
            p += 16;
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut s = hsum(_mm256_add_ps(acc[0], acc[1]));
            for q in p..k {
                s += *wp.add(q) * *x.add(r * k + q);
            }
            *out.add(r) = s;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub(super) fn available() -> bool {
        false
    }

    pub(super) unsafe fn row_dots(_: &[f32], _: &[f32], _: usize, _: *mut f32) {
        unreachable!("row_dots runs only where available() holds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        crate::testing::uniform(len, seed)
            .into_iter()
            .map(|v| v as f32)
            .collect()
    }

    /// Against the sum in f64: every row count up to the limit, an input size that is not a
    /// multiple of the 16-wide step (the scalar tail) and one that is, 37 weight rows split
    /// unevenly across the threads.
    #[test]
    fn matches_the_float64_product() {
        if !simd::available() {
            eprintln!("no AVX2/FMA on this CPU: the kernel never runs here");
            return;
        }
        let n = 37;
        for k in [7, 96, 333] {
            let w = values(n * k, 1);
            for m in 1..=MAX_ROWS {
                let x = values(m * k, 2 + m as u64);
                let got = try_forward(&w, n, k, &x, m).expect("kernel applies");
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| w[j * k + p] as f64 * x[i * k + p] as f64)
                            .sum();
                        let scale: f64 = (0..k)
                            .map(|p| (w[j * k + p] as f64 * x[i * k + p] as f64).abs())
                            .sum();
                        let err = (got[i * n + j] as f64 - want).abs();
                        assert!(
                            err <= 1e-6 * scale,
                            "k={k} m={m} ({i}, {j}): {} vs {want}",
                            got[i * n + j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let w = values(4 * 8, 1);
        let x = values((MAX_ROWS + 1) * 8, 2);
        assert!(try_forward(&w, 4, 8, &x, MAX_ROWS + 1).is_none());
        assert!(try_forward(&w, 4, 8, &[], 0).is_none());
    }
}

//! Matrix products on raw slices through the `gemm` crate (the version candle uses): every
//! operand takes row and column strides, so a transpose is a stride and a column range of a
//! wider buffer is an operand, and the destination can accumulate (`dst += a b`) in place.

/// gemm's thread count follows candle's: `RAYON_NUM_THREADS` when set (read at every call, as
/// candle does), else candle's default, computed once. Without the variable candle recounts
/// the physical cores by reading and parsing /proc/cpuinfo (about 60 us) on every call, which
/// a training step makes dozens of times.
pub(crate) fn threads() -> usize {
    static DEFAULT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    match std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(n) if n > 0 => n,
        _ => *DEFAULT.get_or_init(candle_core::utils::get_num_threads),
    }
}

fn parallelism() -> gemm::Parallelism {
    match threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// A matrix operand: `ptr[i * rs + j * cs]` is element (i, j).
#[derive(Clone, Copy)]
pub(crate) struct Mat<T = f32> {
    pub ptr: *const T,
    pub rs: isize,
    pub cs: isize,
}

impl<T> Mat<T> {
    /// Row-major with `ld` elements between rows.
    pub fn rows(s: &[T], ld: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs: ld as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with leading dimension `ld`.
    pub fn t(s: &[T], ld: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs: 1,
            cs: ld as isize,
        }
    }
}

/// `dst[m, n] (row-major, leading dimension ldd) = (accumulate ? dst : 0) + scale * a[m, k] b[k, n]`,
/// for f32 or f64. With `threads`, on candle's thread count; else on the calling thread (for
/// callers that already run one product per task).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul<T: super::Elem + 'static>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    ldd: usize,
    a: Mat<T>,
    b: Mat<T>,
    scale: T,
    accumulate: bool,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        dst.len() >= (m - 1) * ldd + n,
        "matmul: destination too small"
    );
    // Safety: dst is checked above; the operands come from slices the callers size for the
    // strided ranges they describe. gemm computes dst = 1 * dst + scale * a b, reading dst
    // only when accumulating.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ldd as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            T::one(),
            scale,
            false,
            false,
            false,
            if threads {
                parallelism()
            } else {
                gemm::Parallelism::None
            },
        )
    }
}

//! Which 8-bit integer dot product this CPU has, for the quantized kernel (quantized_gemm.rs).
//! Each path multiplies unsigned weight bytes by signed activation bytes, four
//! products summed into each 32-bit lane: `vpdpbusd` in one instruction with VNNI,
//! `maddubs` + `madd` without it.

use super::interleaved_blocks::Format;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// 256-bit `vpdpbusd` from AVX-512 VNNI (with 32 vector registers).
    Vnni,
    /// The same instruction from AVX-VNNI (16 registers).
    AvxVnni,
    /// `maddubs` + `madd`.
    Avx2,
}

impl Path {
    /// What the weight bytes are shifted by to make them unsigned: q4_0 nibbles are stored as
    /// q + 8; with VNNI q8_0 bytes are flipped to q + 128. Without VNNI q8_0 multiplies |w| by
    /// x with w's sign instead, which cannot saturate `maddubs`.
    pub(crate) fn offset(self, f: Format) -> i32 {
        match (f, self) {
            (Format::Q4_0, _) => 8,
            (Format::Q8_0, Path::Avx2) => 0,
            (Format::Q8_0, _) => 128,
        }
    }
}

/// The fastest path this CPU runs, if it has AVX2, FMA and F16C at all.
#[cfg(target_arch = "x86_64")]
pub(crate) fn detect() -> Option<Path> {
    let base = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    if !base {
        return None;
    }
    Some(
        if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
            Path::Vnni
        } else if is_x86_feature_detected!("avxvnni") {
            Path::AvxVnni
        } else {
            Path::Avx2
        },
    )
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn detect() -> Option<Path> {
    None
}

/// Every path this CPU can run, for the tests.
#[cfg(test)]
pub(crate) fn all_available() -> Vec<Path> {
    match detect() {
        None => vec![],
        Some(Path::Avx2) => vec![Path::Avx2],
        Some(p) => vec![p, Path::Avx2],
    }
}

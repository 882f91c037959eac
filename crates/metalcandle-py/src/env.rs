//! `_core.build_info()`: what this build can run on, for device selection and `metalcandle env`.

use candle_core::Device;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The SIMD levels the CPU offers (runtime detection; the build itself targets x86-64-v3).
fn simd() -> Vec<&'static str> {
    let mut out = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        for (name, on) in [
            ("avx2", is_x86_feature_detected!("avx2")),
            ("fma", is_x86_feature_detected!("fma")),
            ("avx512f", is_x86_feature_detected!("avx512f")),
            ("avx512vnni", is_x86_feature_detected!("avx512vnni")),
            ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
            ("avxvnni", is_x86_feature_detected!("avxvnni")),
        ] {
            if on {
                out.push(name);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            out.push("neon");
        }
        if std::arch::is_aarch64_feature_detected!("dotprod") {
            out.push("dotprod");
        }
    }
    out
}

/// Whether a device can be opened, or why not (the error of the attempt).
fn probe(open: impl FnOnce() -> candle_core::Result<Device>) -> (bool, Option<String>) {
    match open() {
        Ok(_) => (true, None),
        Err(e) => (false, Some(e.to_string())),
    }
}

/// The CPU thread count the core uses when `RAYON_NUM_THREADS` is not set (the physical cores).
#[pyfunction]
pub fn default_threads() -> usize {
    candle_core::utils::get_num_threads()
}

#[pyfunction]
pub fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    let mut features = vec![];
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    d.set_item("features", features)?;
    for (name, (ok, why)) in [
        ("cuda", probe(|| Device::new_cuda(0))),
        ("metal", probe(|| Device::new_metal(0))),
    ] {
        d.set_item(format!("{name}_available"), ok)?;
        d.set_item(format!("{name}_error"), why)?;
    }
    d.set_item("threads", candle_core::utils::get_num_threads())?;
    d.set_item("simd", simd())?;
    d.set_item("arch", std::env::consts::ARCH)?;
    Ok(d)
}

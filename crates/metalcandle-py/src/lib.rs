//! The Python surface of metalcandle: conversion between numpy and tensors, errors as Python
//! exceptions, and the GIL released while Rust computes. No model logic lives here.

mod convert;
mod env;
mod hooks;
mod model;
mod quant;
mod train;

use pyo3::prelude::*;

// A training step allocates and frees the same buffer sizes every time; glibc hands large ones
// back to the kernel, so each step faults and zeroes them again. mimalloc keeps freed pages
// for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::PyModel>()?;
    m.add_class::<model::PyKvCache>()?;
    m.add_class::<train::PyOptimizer>()?;
    m.add_function(wrap_pyfunction!(train::train_step, m)?)?;
    m.add_function(wrap_pyfunction!(train::eval_loss, m)?)?;
    m.add_function(wrap_pyfunction!(quant::gguf_tokenizer_json, m)?)?;
    m.add_function(wrap_pyfunction!(quant::gguf_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(quant::quant_formats, m)?)?;
    m.add_function(wrap_pyfunction!(hooks::hook_points, m)?)?;
    m.add_function(wrap_pyfunction!(hooks::glob_match, m)?)?;
    m.add_function(wrap_pyfunction!(hooks::hook_vocabulary, m)?)?;
    m.add_function(wrap_pyfunction!(env::build_info, m)?)?;
    m.add_function(wrap_pyfunction!(env::default_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! Quantization choices from Python arguments, and GGUF inspection functions.

use crate::convert::{to_py, to_py_err};
use candle_core::quantized::GgmlDType;
use metalcandle_core::quant::{gguf, glob_match, parse_format};
use pyo3::prelude::*;
use std::collections::HashMap;
use std::path::PathBuf;

pub type Chooser = Box<dyn Fn(&str) -> Option<GgmlDType> + Send + Sync>;

/// module name -> format (None keeps float). Exact names win over globs, then `skip`, then
/// the default.
pub fn chooser(
    default: Option<&str>,
    overrides: &HashMap<String, String>,
    skip: &[String],
) -> metalcandle_core::Result<Chooser> {
    let parse = |f: &str| -> metalcandle_core::Result<Option<GgmlDType>> {
        match f.to_ascii_lowercase().as_str() {
            "f32" | "float" | "none" => Ok(None),
            _ => parse_format(f).map(Some),
        }
    };
    let default = default.map(parse).transpose()?.flatten();
    let mut rules: Vec<(String, Option<GgmlDType>)> = overrides
        .iter()
        .map(|(k, v)| Ok((k.clone(), parse(v)?)))
        .collect::<metalcandle_core::Result<_>>()?;
    // Exact names first, then globs by decreasing length (the more specific pattern wins).
    rules.sort_by_key(|(k, _)| (k.contains('*'), std::cmp::Reverse(k.len())));
    let skip = skip.to_vec();
    Ok(Box::new(move |name: &str| {
        if let Some((_, f)) = rules.iter().find(|(k, _)| glob_match(k, name)) {
            return *f;
        }
        if skip.iter().any(|s| glob_match(s, name)) {
            return None;
        }
        default
    }))
}

/// (name, storage bits per weight) of every block format.
#[pyfunction]
pub fn quant_formats() -> Vec<(&'static str, f64)> {
    metalcandle_core::quant::formats().collect()
}

/// The `tokenizer.json` text a GGUF file carries, or None.
#[pyfunction]
pub fn gguf_tokenizer_json(py: Python<'_>, path: PathBuf) -> PyResult<Option<String>> {
    py.detach(|| gguf::gguf_tokenizer_json(&path))
        .map_err(to_py_err)
}

/// A GGUF file's metadata (arrays summarised by their length).
#[pyfunction]
pub fn gguf_metadata(py: Python<'_>, path: PathBuf) -> PyResult<Py<PyAny>> {
    let md = py
        .detach(|| gguf::gguf_metadata(&path))
        .map_err(to_py_err)?;
    to_py(py, &md)
}

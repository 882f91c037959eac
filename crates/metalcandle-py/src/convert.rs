//! numpy <-> candle, serde values -> Python objects, and core errors -> Python exceptions.

use candle_core::{Device, Tensor};
use metalcandle_core::Error;
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

pub fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::Config { .. } | Error::Weights(_) | Error::Input(_) => {
            PyValueError::new_err(e.to_string())
        }
        Error::NotFound(_) => PyFileNotFoundError::new_err(e.to_string()),
        Error::Io { .. } => PyOSError::new_err(e.to_string()),
        Error::Candle(_) | Error::Msg(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

pub fn candle_err(e: candle_core::Error) -> PyErr {
    to_py_err(Error::Candle(e))
}

/// A serde value as the Python object `json.loads` gives for its JSON: dicts, lists, str, int,
/// float, bool and None, so Python gets data, not text to parse.
pub fn to_py<T: serde::Serialize>(py: Python<'_>, value: &T) -> PyResult<Py<PyAny>> {
    let v = serde_json::to_value(value).map_err(|e| PyValueError::new_err(e.to_string()))?;
    json_to_py(py, &v)
}

fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    use pyo3::types::{PyDict, PyList};
    use pyo3::IntoPyObjectExt;
    use serde_json::Value;
    match v {
        Value::Null => Ok(py.None()),
        Value::Bool(b) => b.into_py_any(py),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_py_any(py),
            (None, Some(u)) => u.into_py_any(py),
            _ => n.as_f64().unwrap_or(f64::NAN).into_py_any(py),
        },
        Value::String(s) => s.into_py_any(py),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_py_any(py)
        }
        Value::Object(m) => {
            let d = PyDict::new(py);
            for (k, x) in m {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_py_any(py)
        }
    }
}

/// A 2-D int64 array as (row-major values, (rows, cols)).
pub fn read_i64_2d(a: &PyReadonlyArray2<'_, i64>) -> (Vec<i64>, (usize, usize)) {
    let shape = a.shape();
    (a.as_array().iter().copied().collect(), (shape[0], shape[1]))
}

/// Token ids as a u32 tensor, every id checked against the vocabulary.
pub fn ids_tensor(
    ids: &[i64],
    shape: (usize, usize),
    vocab: usize,
    dev: &Device,
) -> PyResult<Tensor> {
    if let Some((i, bad)) = ids
        .iter()
        .enumerate()
        .find(|(_, &x)| x < 0 || x as usize >= vocab)
    {
        return Err(PyValueError::new_err(format!(
            "input_ids[{}, {}] = {bad} is outside the vocabulary [0, {vocab})",
            i / shape.1.max(1),
            i % shape.1.max(1)
        )));
    }
    let v: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    Tensor::from_vec(v, shape, dev).map_err(candle_err)
}

/// An f32 tensor as a numpy array of the same shape.
pub fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = t.dims().to_vec();
    let v = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(candle_err)?;
    numpy::PyArray1::from_vec(py, v).reshape(dims)
}

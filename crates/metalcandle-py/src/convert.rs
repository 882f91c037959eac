//! numpy <-> candle, and core errors -> Python exceptions.

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

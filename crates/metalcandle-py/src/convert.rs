//! numpy <-> candle, JSON values <-> Python data, and core errors -> Python exceptions.

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

/// Python data (dicts with str keys, lists, tuples, str, int, float, bool, None) as a JSON
/// value; `what` names the argument in errors.
pub fn from_py(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
    use serde_json::Value;
    let bad = |msg: String| PyValueError::new_err(format!("{what}: {msg}"));
    if obj.is_none() {
        return Ok(Value::Null);
    }
    // Before int: a Python bool is an int.
    if obj.is_instance_of::<PyBool>() {
        return Ok(Value::Bool(obj.extract()?));
    }
    if obj.is_instance_of::<PyInt>() {
        return match (obj.extract::<i64>(), obj.extract::<u64>()) {
            (Ok(i), _) => Ok(i.into()),
            (_, Ok(u)) => Ok(u.into()),
            _ => Err(bad(format!("the integer {obj} is out of range"))),
        };
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(Value::String(obj.extract()?));
    }
    if obj.is_instance_of::<PyDict>() {
        let mut m = serde_json::Map::new();
        for item in obj.call_method0("items")?.try_iter()? {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
            let key: String = k
                .extract()
                .map_err(|_| bad(format!("the key {k} is not a string")))?;
            let value = from_py(&v, &format!("{what}.{key}"))?;
            m.insert(key, value);
        }
        return Ok(Value::Object(m));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let items = obj
            .try_iter()?
            .map(|x| from_py(&x?, what))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(Value::Array(items));
    }
    // Floats, and numbers that convert to one (numpy scalars).
    if obj.is_instance_of::<PyFloat>() || obj.hasattr("__float__")? {
        let f: f64 = obj.extract()?;
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| bad(format!("{f} is not a finite number")));
    }
    Err(bad(format!(
        "a {} is not data (expected a dict, list, str, number, bool or None)",
        obj.get_type().name()?
    )))
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

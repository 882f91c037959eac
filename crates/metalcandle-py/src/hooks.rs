//! Hook specifications from Python (a kind, JSON parameters, an optional callable or array)
//! turned into the core's actions. Python callables run with the GIL taken back for the call.
//!
//! A Python hook's failure is also kept here as the Python exception it should raise: a hook at
//! an attention point or in the backward runs inside a candle op, where the core can pass on
//! only its text, so the calls that run hooks (`detach_running_hooks`) raise the kept exception
//! instead: a ValueError for a result of the wrong shape, a RuntimeError caused by the hook's
//! own exception for one that raised.

use crate::convert::{to_numpy, to_py_err};
use candle_core::{Device, Tensor};
use metalcandle_core::hooks::vocab::{self, Section, Takes};
use metalcandle_core::hooks::{BackwardAction, ForwardAction, ForwardFn, GradTransform};
use metalcandle_core::{Error, Result};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    /// The exception of the Python hook that failed during the current call into the core. Hooks
    /// run on the thread that called into the core (the GIL is released, the thread stays).
    static HOOK_ERROR: RefCell<Option<PyErr>> = const { RefCell::new(None) };
}

fn keep_hook_error(e: PyErr) {
    HOOK_ERROR.with(|slot| *slot.borrow_mut() = Some(e));
}

fn take_hook_error() -> Option<PyErr> {
    HOOK_ERROR.with(|slot| slot.borrow_mut().take())
}

/// Runs `f`, a core call that may run hooks, with the GIL released. Its error is the exception a
/// failed Python hook kept, when one did, else the core error's own.
pub fn detach_running_hooks<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: Send + FnOnce() -> Result<T>,
    T: Send,
{
    take_hook_error(); // nothing from an earlier call
    let out = py.detach(f);
    let hook_error = take_hook_error();
    out.map_err(|e| hook_error.unwrap_or_else(|| to_py_err(e)))
}

/// `Error::Input` for a hook result whose shape is not the value's, kept as a ValueError.
fn check_shape(what: &str, got: &Tensor, expected: &Tensor) -> Result<()> {
    if got.dims() == expected.dims() {
        return Ok(());
    }
    let msg = format!(
        "{what} returned shape {:?}, expected {:?}",
        got.dims(),
        expected.dims()
    );
    keep_hook_error(PyValueError::new_err(msg.clone()));
    Err(Error::Input(msg))
}

/// Every hook point of a model with `num_layers` blocks, in the order a forward reaches them.
#[pyfunction]
pub fn hook_points(num_layers: usize) -> Vec<String> {
    metalcandle_core::hooks::point_names(num_layers)
}

/// Whether a hook or module pattern matches a name: `*` is any run of characters.
#[pyfunction]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    metalcandle_core::weights::names::glob_match(pattern, name)
}

/// Runs a Python hook on a gradient: its None keeps `g` as it is (no copy back from numpy),
/// anything else is read back as the new gradient.
fn call_or_keep(
    g: &Tensor,
    what: &str,
    call: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>,
) -> Result<Tensor> {
    let r = Python::attach(|py| -> PyResult<Tensor> {
        let out = call(py)?;
        if out.is_none(py) {
            return Ok(g.clone());
        }
        from_numpy(out.bind(py), g.device())
    })
    .map_err(|e| py_err(what, e))?;
    check_shape(what, &r, g)?;
    Ok(r)
}

fn callable(f: Option<Py<PyAny>>, kind: &str) -> Result<Py<PyAny>> {
    f.ok_or_else(|| Error::Input(format!("hook kind \"{kind}\" needs a Python callable")))
}

/// A numpy array as an f32 tensor on `dev`.
fn from_numpy(a: &Bound<'_, PyAny>, dev: &Device) -> PyResult<Tensor> {
    let a: PyReadonlyArrayDyn<'_, f32> = a.extract()?;
    let shape = a.shape().to_vec();
    let v: Vec<f32> = a.as_array().iter().copied().collect();
    Tensor::from_vec(v, shape, dev).map_err(crate::convert::candle_err)
}

/// A Python hook's exception as a core error naming the hook; kept as a RuntimeError with the same
/// message, caused by the exception.
fn py_err(context: &str, e: PyErr) -> Error {
    let msg = format!("{context}: {e}");
    Python::attach(|py| {
        let kept = PyRuntimeError::new_err(msg.clone());
        kept.set_cause(py, Some(e));
        keep_hook_error(kept);
    });
    Error::Msg(msg)
}

/// Whether `kind` of `section` is the one that runs a Python function (any other, even an
/// unknown one, is left to the core's built-ins and their errors).
fn runs_a_function(section: Section, kind: &str) -> bool {
    vocab::find(section, kind).is_ok_and(|k| k.takes == Takes::Function)
}

pub fn forward_action(
    kind: &str,
    params: &Value,
    f: Option<Py<PyAny>>,
    array: Option<Tensor>,
) -> Result<ForwardAction> {
    if !runs_a_function(Section::Forward, kind) {
        return ForwardAction::built_in(kind, params, array);
    }
    let f = callable(f, kind)?;
    let run: ForwardFn = Arc::new(move |point, x| {
        let out = Python::attach(|py| -> PyResult<Option<Tensor>> {
            let out = f.call1(py, (point, to_numpy(py, x)?))?;
            if out.is_none(py) {
                return Ok(None);
            }
            Ok(Some(from_numpy(out.bind(py), x.device())?))
        })
        .map_err(|e| py_err(&format!("forward hook at \"{point}\""), e))?;
        if let Some(r) = &out {
            check_shape(&format!("hook at \"{point}\""), r, x)?;
        }
        Ok(out)
    });
    Ok(ForwardAction::Custom(run))
}

pub fn backward_action(kind: &str, params: &Value, f: Option<Py<PyAny>>) -> Result<BackwardAction> {
    if !runs_a_function(Section::Backward, kind) {
        return BackwardAction::built_in(kind, params);
    }
    let f = callable(f, kind)?;
    Ok(BackwardAction::Custom(Arc::new(move |point, g| {
        call_or_keep(g, &format!("backward hook at \"{point}\""), |py| {
            f.call1(py, (point, to_numpy(py, g)?))
        })
    })))
}

pub fn update_transform(kind: &str, params: &Value, f: Option<Py<PyAny>>) -> Result<GradTransform> {
    if !runs_a_function(Section::Update, kind) {
        return GradTransform::built_in(kind, params);
    }
    let f = callable(f, kind)?;
    Ok(GradTransform::Custom(Arc::new(move |name, p, g| {
        call_or_keep(g, &format!("update hook on `{name}`"), |py| {
            f.call1(py, (name, to_numpy(py, p)?, to_numpy(py, g)?))
        })
    })))
}

/// The hook vocabulary (`metalcandle_core::hooks::vocabulary`).
#[pyfunction]
pub fn hook_vocabulary(py: Python<'_>) -> PyResult<Py<PyAny>> {
    crate::convert::to_py(py, &metalcandle_core::hooks::vocabulary())
}

/// A patch array from Python as a tensor on the model's device.
pub fn patch_array(a: Option<&Bound<'_, PyAny>>, dev: &Device) -> PyResult<Option<Tensor>> {
    a.map(|a| from_numpy(a, dev)).transpose()
}

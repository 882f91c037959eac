//! Hook specifications from Python (a kind, JSON parameters, an optional callable or array)
//! turned into the core's actions. Python callables run with the GIL taken back for the call.

use crate::convert::to_numpy;
use candle_core::{Device, Tensor};
use metalcandle_core::hooks::{AuxLoss, BackwardAction, ForwardAction, ForwardFn, GradTransform};
use metalcandle_core::{Error, Result};
use numpy::{PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use serde_json::Value;
use std::sync::Arc;

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
    Python::attach(|py| -> PyResult<Tensor> {
        let out = call(py)?;
        if out.is_none(py) {
            return Ok(g.clone());
        }
        from_numpy(out.bind(py), g.device())
    })
    .map_err(|e| py_err(what, e))
}

fn num(params: &Value, kind: &str, key: &str) -> Result<f64> {
    params
        .get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| Error::Input(format!("hook kind \"{kind}\" needs a number `{key}`")))
}

fn seed(params: &Value) -> u64 {
    params.get("seed").and_then(Value::as_u64).unwrap_or(0)
}

fn unknown(what: &str, kind: &str, known: &[&str]) -> Error {
    Error::Input(format!(
        "unknown {what} hook kind \"{kind}\" (expected one of: {})",
        known.join(", ")
    ))
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

fn py_err(context: &str, e: PyErr) -> Error {
    Error::Msg(format!("{context}: {e}"))
}

pub fn forward_action(
    kind: &str,
    params: &Value,
    f: Option<Py<PyAny>>,
    array: Option<Tensor>,
) -> Result<ForwardAction> {
    Ok(match kind {
        "capture" => ForwardAction::Capture {
            full: params.get("full").and_then(Value::as_bool).unwrap_or(true),
        },
        "scale" => ForwardAction::Scale(num(params, kind, "factor")?),
        "noise" => ForwardAction::Noise {
            std: num(params, kind, "std")?,
            seed: seed(params),
        },
        "clamp" => ForwardAction::Clamp {
            min: params
                .get("min")
                .and_then(Value::as_f64)
                .unwrap_or(f64::MIN),
            max: params
                .get("max")
                .and_then(Value::as_f64)
                .unwrap_or(f64::MAX),
        },
        "ablate_heads" => ForwardAction::AblateHeads(
            params
                .get("heads")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h.as_u64().map(|h| h as usize))
                        .collect()
                })
                .ok_or_else(|| {
                    Error::Input("hook kind \"ablate_heads\" needs a list `heads`".into())
                })?,
        ),
        "patch" => ForwardAction::Patch(array.ok_or_else(|| {
            Error::Input("hook kind \"patch\" needs the activation array to patch in".into())
        })?),
        "python" => {
            let f = callable(f, kind)?;
            let run: ForwardFn = Arc::new(move |point, x| {
                Python::attach(|py| -> PyResult<Option<Tensor>> {
                    let out = f.call1(py, (point, to_numpy(py, x)?))?;
                    if out.is_none(py) {
                        return Ok(None);
                    }
                    Ok(Some(from_numpy(out.bind(py), x.device())?))
                })
                .map_err(|e| py_err(&format!("forward hook at \"{point}\""), e))
            });
            ForwardAction::Custom(run)
        }
        other => {
            return Err(unknown(
                "forward",
                other,
                &[
                    "capture",
                    "scale",
                    "noise",
                    "clamp",
                    "ablate_heads",
                    "patch",
                    "python",
                ],
            ))
        }
    })
}

pub fn backward_action(kind: &str, params: &Value, f: Option<Py<PyAny>>) -> Result<BackwardAction> {
    Ok(match kind {
        "scale" => BackwardAction::Scale(num(params, kind, "factor")?),
        "clip_value" => BackwardAction::ClipValue(num(params, kind, "max")?),
        "clip_norm" => BackwardAction::ClipNorm(num(params, kind, "max")?),
        "stop_gradient" => BackwardAction::StopGradient,
        "straight_through" => BackwardAction::StraightThrough,
        "noise" => BackwardAction::Noise {
            std: num(params, kind, "std")?,
            seed: seed(params),
        },
        "python" => {
            let f = callable(f, kind)?;
            BackwardAction::Custom(Arc::new(move |point, g| {
                call_or_keep(g, &format!("backward hook at \"{point}\""), |py| {
                    f.call1(py, (point, to_numpy(py, g)?))
                })
            }))
        }
        other => {
            return Err(unknown(
                "backward",
                other,
                &[
                    "scale",
                    "clip_value",
                    "clip_norm",
                    "stop_gradient",
                    "straight_through",
                    "noise",
                    "python",
                ],
            ))
        }
    })
}

pub fn update_transform(kind: &str, params: &Value, f: Option<Py<PyAny>>) -> Result<GradTransform> {
    Ok(match kind {
        "clip_value" => GradTransform::ClipValue(num(params, kind, "max")?),
        "clip_norm" => GradTransform::ClipNorm(num(params, kind, "max")?),
        "noise" => GradTransform::Noise {
            std: num(params, kind, "std")?,
            seed: seed(params),
        },
        "sign" => GradTransform::Sign,
        "normalize" => GradTransform::Normalize,
        "centralize" => GradTransform::Centralize,
        "freeze" => GradTransform::Freeze,
        "python" => {
            let f = callable(f, kind)?;
            GradTransform::Custom(Arc::new(move |name, p, g| {
                call_or_keep(g, &format!("update hook on `{name}`"), |py| {
                    f.call1(py, (name, to_numpy(py, p)?, to_numpy(py, g)?))
                })
            }))
        }
        other => {
            return Err(unknown(
                "update",
                other,
                &[
                    "clip_value",
                    "clip_norm",
                    "noise",
                    "sign",
                    "normalize",
                    "centralize",
                    "freeze",
                    "python",
                ],
            ))
        }
    })
}

pub fn aux_loss(kind: &str, weight: f64, point: Option<String>) -> Result<AuxLoss> {
    let point_for = |default: &str| point.clone().unwrap_or_else(|| default.to_string());
    Ok(match kind {
        "activation_l2" => AuxLoss::ActivationL2 {
            point: point
                .clone()
                .ok_or_else(|| Error::Input("aux loss \"activation_l2\" needs a `point`".into()))?,
            weight,
        },
        "z_loss" => AuxLoss::ZLoss { weight },
        "attention_entropy" => AuxLoss::AttentionEntropy {
            point: point_for("layers.*.attn_probs"),
            weight,
        },
        other => {
            return Err(unknown(
                "aux-loss",
                other,
                &["activation_l2", "z_loss", "attention_entropy"],
            ))
        }
    })
}

/// A patch array from Python as a tensor on the model's device.
pub fn patch_array(a: Option<&Bound<'_, PyAny>>, dev: &Device) -> PyResult<Option<Tensor>> {
    a.map(|a| from_numpy(a, dev)).transpose()
}

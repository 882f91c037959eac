//! `_core.Optimizer`, `_core.train_step` and `_core.eval_loss`.

use crate::convert::{ids_tensor, read_i64_2d, to_py, to_py_err};
use crate::hooks;
use crate::model::PyModel;
use metalcandle_core::optim::{Algorithm, Optimizer, OptimizerConfig};
use metalcandle_core::reduce::GradReducer;
use metalcandle_core::train::{train_step_with, Batch, StepOptions, StepPath};
use metalcandle_core::Error;
use numpy::ndarray::ArrayViewMut1;
use numpy::{Element, PyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use std::path::PathBuf;

#[pyclass(name = "Optimizer", module = "metalcandle._core")]
pub struct PyOptimizer {
    inner: Optimizer,
}

#[pymethods]
impl PyOptimizer {
    /// `algorithm`: "adamw", "sgd" (with `momentum`, `nesterov`) or "lion" (betas as in the
    /// paper: beta1 interpolates the update, beta2 the moment).
    #[new]
    #[pyo3(signature = (algorithm = "adamw", lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01, no_decay = vec![], momentum = 0.0, nesterov = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        algorithm: &str,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        no_decay: Vec<String>,
        momentum: f64,
        nesterov: bool,
    ) -> PyResult<Self> {
        let algorithm = match algorithm {
            "adamw" => Algorithm::AdamW,
            "sgd" => Algorithm::Sgd { momentum, nesterov },
            "lion" => Algorithm::Lion,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown optimizer \"{other}\" (expected \"adamw\", \"sgd\" or \"lion\")"
                )))
            }
        };
        let cfg = OptimizerConfig {
            algorithm,
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            no_decay,
        };
        Ok(Self {
            inner: Optimizer::new(cfg).map_err(to_py_err)?,
        })
    }

    #[getter]
    fn get_lr(&self) -> f64 {
        self.inner.config.lr
    }

    #[setter]
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn set_lr(&mut self, lr: f64) -> PyResult<()> {
        if !(lr >= 0.0) {
            return Err(PyValueError::new_err(format!("lr must be >= 0, got {lr}")));
        }
        self.inner.config.lr = lr;
        Ok(())
    }

    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self.inner.config)
    }

    /// Per-parameter step counts.
    fn steps(&self) -> std::collections::BTreeMap<String, u64> {
        self.inner.steps()
    }

    fn save(&self, path: PathBuf) -> PyResult<()> {
        self.inner.save(&path).map_err(to_py_err)
    }

    fn load(&mut self, path: PathBuf) -> PyResult<()> {
        self.inner
            .load(&path, &candle_core::Device::Cpu)
            .map_err(to_py_err)
    }
}

type Arr<'py> = PyReadonlyArray2<'py, i64>;

fn batches(
    model: &PyModel,
    ids: Vec<Arr<'_>>,
    labels: Vec<Arr<'_>>,
    masks: Option<Vec<Arr<'_>>>,
    pre_shifted: bool,
) -> PyResult<Vec<Batch>> {
    if ids.len() != labels.len() || masks.as_ref().is_some_and(|m| m.len() != ids.len()) {
        return Err(PyValueError::new_err(
            "input_ids, labels and attention_mask must list the same number of micro-batches",
        ));
    }
    let mut out = vec![];
    for (i, (x, y)) in ids.iter().zip(labels.iter()).enumerate() {
        let (xv, shape) = read_i64_2d(x);
        let (yv, yshape) = read_i64_2d(y);
        if yshape != shape {
            return Err(PyValueError::new_err(format!(
                "labels have shape {yshape:?}, input_ids {shape:?}"
            )));
        }
        let attention_mask = match &masks {
            Some(m) => {
                let (mv, mshape) = read_i64_2d(&m[i]);
                if mshape != shape {
                    return Err(PyValueError::new_err(format!(
                        "attention_mask has shape {mshape:?}, input_ids {shape:?}"
                    )));
                }
                Some(mv)
            }
            None => None,
        };
        let ids = ids_tensor(&xv, shape, model.inner.spec.vocab_size, &model.inner.device)?;
        out.push(Batch {
            ids,
            labels: yv,
            attention_mask,
            pre_shifted,
        });
    }
    Ok(out)
}

/// (loss, pre-clip gradient norm, label tokens, aux losses, path, why composed).
type StepResult = (f64, f64, usize, Vec<(String, f64)>, String, Option<String>);

/// Sums through a Python callable that all-reduces a 1-D numpy array in place (an mpi4py
/// `Allreduce(MPI.IN_PLACE, ...)`); the array is a view of the step's own buffer, so the
/// gradients cross into MPI without a copy.
struct PyReducer {
    allreduce: Py<PyAny>,
    /// The callable's exception, raised as it is instead of as a core error.
    error: Option<PyErr>,
}

impl PyReducer {
    fn sum<T: Element>(&mut self, values: &mut [T]) -> metalcandle_core::Result<()> {
        let allreduce = &self.allreduce;
        let result = Python::attach(|py| {
            let view = ArrayViewMut1::from(&mut *values);
            // SAFETY: the array borrows `values`, which outlives the call; the callable sums in
            // place and returns, keeping no reference (mpi4py's Allreduce holds none).
            let array = unsafe { PyArray1::borrow_from_array(&view, py.None().into_bound(py)) };
            allreduce.call1(py, (array,)).map(drop)
        });
        result.map_err(|e| {
            let msg = format!("all-reduce failed: {e}");
            self.error = Some(e);
            Error::Msg(msg)
        })
    }
}

impl GradReducer for PyReducer {
    fn sum_f64(&mut self, values: &mut [f64]) -> metalcandle_core::Result<()> {
        self.sum(values)
    }
    fn sum_f32(&mut self, values: &mut [f32]) -> metalcandle_core::Result<()> {
        self.sum(values)
    }
}

/// One optimizer step over micro-batches; returns (loss, pre-clip gradient norm, label tokens,
/// [(aux loss name, unweighted value)], "fused" or "composed", the reason when composed). With
/// `allreduce` (a callable summing a numpy array in place over the workers) the micro-batches
/// are this worker's share of a global step.
#[pyfunction]
#[pyo3(signature = (model, optimizer, input_ids, labels, attention_mask = None, max_grad_norm = None, pre_shifted = false, allreduce = None, fused = true, gradient_checkpointing = false, dropout_seed = 0, first_rows = vec![]))]
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    py: Python<'_>,
    mut model: PyRefMut<'_, PyModel>,
    mut optimizer: PyRefMut<'_, PyOptimizer>,
    input_ids: Vec<Arr<'_>>,
    labels: Vec<Arr<'_>>,
    attention_mask: Option<Vec<Arr<'_>>>,
    max_grad_norm: Option<f64>,
    pre_shifted: bool,
    allreduce: Option<Py<PyAny>>,
    fused: bool,
    gradient_checkpointing: bool,
    dropout_seed: u64,
    first_rows: Vec<u64>,
) -> PyResult<StepResult> {
    let b = batches(&model, input_ids, labels, attention_mask, pre_shifted)?;
    let (m, o) = (&mut model.inner, &mut optimizer.inner);
    let mut reducer = allreduce.map(|allreduce| PyReducer {
        allreduce,
        error: None,
    });
    let r = reducer.as_mut();
    let stats = hooks::detach_running_hooks(py, || {
        let opts = StepOptions {
            max_grad_norm,
            fused,
            gradient_checkpointing,
            reducer: r.map(|r| r as _),
            dropout_seed,
            first_rows: &first_rows,
        };
        train_step_with(m, o, &b, opts)
    });
    let stats = match stats {
        Ok(s) => s,
        Err(e) => return Err(reducer.and_then(|r| r.error).unwrap_or(e)),
    };
    let why = match &stats.path {
        StepPath::Composed(r) => Some(r.clone()),
        StepPath::Fused => None,
    };
    Ok((
        stats.loss,
        stats.grad_norm,
        stats.tokens,
        stats.aux,
        stats.path.name().to_string(),
        why,
    ))
}

/// The summed loss over every label token, and the number of those tokens, without gradients.
#[pyfunction]
#[pyo3(signature = (model, input_ids, labels, attention_mask = None, pre_shifted = false))]
pub fn eval_loss(
    py: Python<'_>,
    model: PyRef<'_, PyModel>,
    input_ids: Vec<Arr<'_>>,
    labels: Vec<Arr<'_>>,
    attention_mask: Option<Vec<Arr<'_>>>,
    pre_shifted: bool,
) -> PyResult<(f64, usize)> {
    let b = batches(&model, input_ids, labels, attention_mask, pre_shifted)?;
    let m = &model.inner;
    hooks::detach_running_hooks(py, || m.eval_loss_sum(&b))
}

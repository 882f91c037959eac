//! `_core.Model` and `_core.KvCache`.

use crate::convert::{candle_err, from_py, ids_tensor, read_i64_2d, to_numpy, to_py, to_py_err};
use crate::hooks;
use crate::quant;
use candle_core::{Device, Tensor};
use metalcandle_core::hooks::{AuxLoss, Captured, Hooks};
use metalcandle_core::lora::LoraConfig;
use metalcandle_core::model::ForwardOptions;
use metalcandle_core::quant::gguf::{load_gguf, save_gguf, GgufTokenizer};
use metalcandle_core::quant::{format_name, parse_format};
use metalcandle_core::weights::{load_hf_folder_as, save_hf_folder};
use metalcandle_core::{Decoder, KvCache, ModelSpec};
use numpy::{PyArrayDyn, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

type Array<'py> = Bound<'py, PyArrayDyn<f32>>;

#[pyclass(name = "Model", module = "metalcandle._core")]
pub struct PyModel {
    pub inner: Decoder,
}

#[pyclass(name = "KvCache", module = "metalcandle._core")]
pub struct PyKvCache {
    pub inner: KvCache,
}

#[pymethods]
impl PyKvCache {
    /// Number of tokens the cache holds.
    #[getter]
    fn seq_len(&self) -> usize {
        self.inner.seq_len()
    }

    /// Keeps batch rows `rows`, in that order (beam search reorders and grows beams this way).
    fn select_rows(&mut self, py: Python<'_>, rows: Vec<u32>) -> PyResult<()> {
        let cache = &mut self.inner;
        py.detach(|| cache.select_rows(&rows)).map_err(to_py_err)
    }
}

fn device(name: &str) -> PyResult<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0)
            .map_err(|e| PyValueError::new_err(format!("device \"cuda\" is not available: {e}"))),
        "metal" => Device::new_metal(0)
            .map_err(|e| PyValueError::new_err(format!("device \"metal\" is not available: {e}"))),
        other => Err(PyValueError::new_err(format!(
            "unknown device \"{other}\" (expected \"cpu\", \"cuda\" or \"metal\")"
        ))),
    }
}

struct Inputs {
    ids: Tensor,
    mask: Option<Vec<i64>>,
    positions: Option<Vec<i64>>,
}

impl PyModel {
    fn inputs(
        &self,
        input_ids: PyReadonlyArray2<'_, i64>,
        attention_mask: Option<PyReadonlyArray2<'_, i64>>,
        position_ids: Option<PyReadonlyArray2<'_, i64>>,
    ) -> PyResult<Inputs> {
        let (ids, shape) = read_i64_2d(&input_ids);
        let ids = ids_tensor(&ids, shape, self.inner.spec.vocab_size, &self.inner.device)?;
        let mask = attention_mask.map(|m| read_i64_2d(&m).0);
        let positions = position_ids.map(|p| read_i64_2d(&p).0);
        Ok(Inputs {
            ids,
            mask,
            positions,
        })
    }
}

#[pymethods]
impl PyModel {
    /// Loads a Hugging Face checkpoint folder, its weights in `dtype` (float32, bfloat16 or
    /// float16) on `device`.
    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu", dtype = "float32"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, dtype: &str) -> PyResult<Self> {
        let dtype = match dtype {
            "float32" => candle_core::DType::F32,
            "bfloat16" => candle_core::DType::BF16,
            "float16" => candle_core::DType::F16,
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype {other:?}: expected \"float32\", \"bfloat16\" or \"float16\""
                )))
            }
        };
        let dev = self::device(device)?;
        let inner = py
            .detach(|| load_hf_folder_as(&path, &dev, dtype))
            .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// A randomly initialised model from a `config.json`-style dict (any supported `model_type`).
    #[staticmethod]
    #[pyo3(signature = (config, seed = 0, device = "cpu"))]
    fn from_config(config: &Bound<'_, PyAny>, seed: u64, device: &str) -> PyResult<Self> {
        let dev = self::device(device)?;
        let config = from_py(config, "config")?;
        let spec = ModelSpec::from_hf_config(&config, "config").map_err(to_py_err)?;
        let inner = Decoder::random(spec, config, seed, &dev).map_err(to_py_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn architecture(&self) -> &'static str {
        self.inner.spec.architecture.as_str()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.spec.vocab_size
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.spec.num_layers()
    }

    #[getter]
    fn max_position_embeddings(&self) -> usize {
        self.inner.spec.max_position_embeddings
    }

    /// The model's config.json.
    fn config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self.inner.config)
    }

    /// The resolved ModelSpec.
    fn spec(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self.inner.spec)
    }

    fn num_parameters(&self) -> usize {
        self.inner.num_parameters()
    }

    fn parameter_names(&self) -> Vec<String> {
        self.inner
            .parameters()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// One parameter as a numpy array, in the model's layout.
    fn get_parameter<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let t = self
            .inner
            .parameters()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| {
                let quantized = self
                    .inner
                    .quantized_weights()
                    .iter()
                    .any(|(m, _)| format!("{m}.weight") == name);
                PyValueError::new_err(if quantized {
                    format!("`{name}` is quantized: dequantize the model to read it as an array")
                } else {
                    format!("no parameter named `{name}`")
                })
            })?;
        to_numpy(py, &t)
    }

    /// (used, total) bytes of the model's GPU; None on the CPU (and on Metal, which reports
    /// no such figure through candle).
    fn device_memory(&self) -> Option<(usize, usize)> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.inner.device {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            return Some((total - free, total));
        }
        None
    }

    fn new_cache(&self) -> PyKvCache {
        PyKvCache {
            inner: self.inner.new_cache(),
        }
    }

    /// Full forward: logits [B, T, V] and, when asked, hidden states [L+1, B, T, H].
    #[pyo3(signature = (input_ids, attention_mask = None, position_ids = None, output_hidden_states = false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        position_ids: Option<PyReadonlyArray2<'py, i64>>,
        output_hidden_states: bool,
    ) -> PyResult<(Array<'py>, Option<Array<'py>>)> {
        let inp = self.inputs(input_ids, attention_mask, position_ids)?;
        // The model holds no variables (training keeps them apart), so it records no graph.
        let model = &self.inner;
        let (logits, hidden) = hooks::detach_running_hooks(py, || {
            let opts = ForwardOptions {
                attention_mask: inp.mask.as_deref(),
                position_ids: inp.positions.as_deref(),
                output_hidden_states,
                dropout: None,
            };
            let (logits, hidden) = model.forward(&inp.ids, &opts, None)?;
            let hidden = if output_hidden_states {
                Some(Tensor::stack(&hidden, 0)?)
            } else {
                None
            };
            Ok((logits, hidden))
        })?;
        let hidden = hidden.map(|h| to_numpy(py, &h)).transpose()?;
        Ok((to_numpy(py, &logits)?, hidden))
    }

    /// Runs new tokens through the cache and returns the last position's logits [B, V].
    #[pyo3(signature = (input_ids, cache, attention_mask = None, position_ids = None))]
    fn forward_cached<'py>(
        &self,
        py: Python<'py>,
        input_ids: PyReadonlyArray2<'py, i64>,
        cache: &mut PyKvCache,
        attention_mask: Option<PyReadonlyArray2<'py, i64>>,
        position_ids: Option<PyReadonlyArray2<'py, i64>>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let inp = self.inputs(input_ids, attention_mask, position_ids)?;
        let (model, cache) = (&self.inner, &mut cache.inner);
        let logits = hooks::detach_running_hooks(py, || {
            let opts = ForwardOptions {
                attention_mask: inp.mask.as_deref(),
                position_ids: inp.positions.as_deref(),
                output_hidden_states: false,
                dropout: None,
            };
            model.forward_last(&inp.ids, &opts, Some(cache))
        })?;
        to_numpy(py, &logits)
    }

    /// Attaches fresh LoRA adapters (PEFT initialisation); returns how many linears got one.
    #[pyo3(signature = (r, alpha, dropout, target_modules, seed, use_rslora = false, layers_to_transform = None))]
    #[allow(clippy::too_many_arguments)]
    fn add_lora(
        &mut self,
        r: usize,
        alpha: f64,
        dropout: f64,
        target_modules: Vec<String>,
        seed: u64,
        use_rslora: bool,
        layers_to_transform: Option<Vec<usize>>,
    ) -> PyResult<usize> {
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            use_rslora,
            target_modules,
            layers_to_transform,
        };
        self.inner.add_lora(cfg, seed).map_err(to_py_err)
    }

    fn load_adapter(&mut self, path: PathBuf) -> PyResult<usize> {
        self.inner.load_adapter(&path).map_err(to_py_err)
    }

    fn save_adapter(&self, path: PathBuf) -> PyResult<()> {
        self.inner.save_adapter(&path).map_err(to_py_err)
    }

    fn merge_adapter(&mut self) -> PyResult<()> {
        self.inner.merge_adapter().map_err(to_py_err)
    }

    fn unmerge_adapter(&mut self) -> PyResult<()> {
        self.inner.unmerge_adapter().map_err(to_py_err)
    }

    fn remove_adapter(&mut self) {
        self.inner.remove_adapter()
    }

    #[getter]
    fn has_adapter(&self) -> bool {
        self.inner.has_adapter()
    }

    /// The LoRA config, or None.
    fn lora_config(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self.inner.lora_config)
    }

    /// Names and arrays of what a training step updates (adapter matrices, or every parameter).
    fn trainable_parameters<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Vec<(String, Bound<'py, PyArrayDyn<f32>>)>> {
        let tensors = self.inner.trainable_tensors().map_err(to_py_err)?;
        tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_numpy(py, t)?)))
            .collect()
    }

    /// Overwrites what a training step updates with `values` (name -> array, every trainable
    /// tensor exactly once, in its shape): how data-parallel workers take rank 0's weights.
    fn set_trainable_parameters(
        &mut self,
        values: HashMap<String, PyReadonlyArrayDyn<'_, f32>>,
    ) -> PyResult<()> {
        let vars = self.inner.make_trainable().map_err(to_py_err)?;
        if values.len() != vars.len() {
            return Err(PyValueError::new_err(format!(
                "expected {} trainable tensors, got {}",
                vars.len(),
                values.len()
            )));
        }
        for (name, var) in &vars {
            let a = values.get(name).ok_or_else(|| {
                PyValueError::new_err(format!("no value for trainable tensor `{name}`"))
            })?;
            if a.shape() != var.dims() {
                return Err(PyValueError::new_err(format!(
                    "`{name}`: expected shape {:?}, got {:?}",
                    var.dims(),
                    a.shape()
                )));
            }
            let data: Vec<f32> = a.as_array().iter().copied().collect();
            let t = Tensor::from_vec(data, var.shape(), var.device())
                .and_then(|t| t.to_dtype(var.dtype()))
                .map_err(candle_err)?;
            var.set(&t).map_err(candle_err)?;
        }
        Ok(())
    }

    /// Writes config.json and model.safetensors (Hugging Face names and layouts).
    fn save_pretrained(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        let model = &self.inner;
        py.detach(|| save_hf_folder(model, &path))
            .map_err(to_py_err)
    }

    /// Quantizes matrices in place: `default` for every one, `overrides` (module name or glob
    /// -> format, or "f32" to keep float) before it, `skip` globs kept float. Returns the
    /// report.
    #[pyo3(signature = (default, overrides, skip))]
    fn quantize(
        &mut self,
        py: Python<'_>,
        default: Option<String>,
        overrides: HashMap<String, String>,
        skip: Vec<String>,
    ) -> PyResult<Py<PyAny>> {
        let choose = quant::chooser(default.as_deref(), &overrides, &skip).map_err(to_py_err)?;
        let model = &mut self.inner;
        let report = py.detach(|| model.quantize(&*choose)).map_err(to_py_err)?;
        to_py(py, &report)
    }

    /// Turns quantization-aware training on, choosing formats as `quantize` does; returns
    /// ({module: format}, {module: why it stays float}).
    #[pyo3(signature = (default, overrides, skip))]
    fn set_qat(
        &mut self,
        default: Option<String>,
        overrides: HashMap<String, String>,
        skip: Vec<String>,
    ) -> PyResult<(BTreeMap<String, String>, BTreeMap<String, String>)> {
        let choose = quant::chooser(default.as_deref(), &overrides, &skip).map_err(to_py_err)?;
        let report = self.inner.set_qat(&*choose).map_err(to_py_err)?;
        Ok((report.quantized, report.kept_float))
    }

    fn clear_qat(&mut self) {
        self.inner.qat = None;
    }

    /// {module: format} of the matrices a training step rounds, or None.
    #[getter]
    fn qat(&self) -> Option<BTreeMap<String, String>> {
        self.inner.qat.as_ref().map(|q| {
            q.formats
                .iter()
                .map(|(n, d)| (n.clone(), format_name(*d).to_string()))
                .collect()
        })
    }

    fn dequantize(&mut self, py: Python<'_>) -> PyResult<()> {
        let model = &mut self.inner;
        py.detach(|| model.dequantize()).map_err(to_py_err)
    }

    #[getter]
    fn is_quantized(&self) -> bool {
        self.inner.is_quantized()
    }

    fn quantization_info(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self.inner.quantization_info())
    }

    /// Records each matrix's inputs on `batches` and measures every candidate format's
    /// output error on them; the errors per module, with the chosen format.
    fn calibrate(
        &mut self,
        py: Python<'_>,
        batches: Vec<PyReadonlyArray2<'_, i64>>,
        candidates: Vec<String>,
        tolerance: f64,
    ) -> PyResult<Py<PyAny>> {
        let ids = batches
            .iter()
            .map(|b| {
                let (v, shape) = read_i64_2d(b);
                ids_tensor(&v, shape, self.inner.spec.vocab_size, &self.inner.device)
            })
            .collect::<PyResult<Vec<_>>>()?;
        let formats = candidates
            .iter()
            .map(|c| parse_format(c))
            .collect::<metalcandle_core::Result<Vec<_>>>()
            .map_err(to_py_err)?;
        let model = &mut self.inner;
        let out = hooks::detach_running_hooks(py, || model.calibrate(&ids, &formats, tolerance))?;
        to_py(py, &out)
    }

    /// Writes the model (float, quantized or mixed) as one GGUF file, with the tokenizer.
    #[pyo3(signature = (path, tokenizer_json = None, chat_template = None, pad_token_id = None))]
    fn save_gguf(
        &self,
        py: Python<'_>,
        path: PathBuf,
        tokenizer_json: Option<String>,
        chat_template: Option<String>,
        pad_token_id: Option<u32>,
    ) -> PyResult<()> {
        let model = &self.inner;
        let tokenizer = GgufTokenizer {
            json: tokenizer_json,
            chat_template,
            pad_token_id,
        };
        py.detach(|| save_gguf(model, &path, &tokenizer))
            .map_err(to_py_err)
    }

    #[staticmethod]
    #[pyo3(signature = (path, device = "cpu"))]
    fn load_gguf(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let dev = self::device(device)?;
        let inner = py.detach(|| load_gguf(&path, &dev)).map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// Attaches a forward hook (`kind` with JSON `params`; "python" takes `fn`, "patch` takes
    /// `array`) at the points `point` matches; returns its id.
    #[pyo3(signature = (point, kind, params, r#fn = None, array = None))]
    fn add_forward_hook(
        &mut self,
        point: &str,
        kind: &str,
        params: &Bound<'_, PyAny>,
        r#fn: Option<Py<PyAny>>,
        array: Option<Bound<'_, PyAny>>,
    ) -> PyResult<u64> {
        Hooks::check_point(point, self.inner.blocks.len()).map_err(to_py_err)?;
        let params = from_py(params, "hook parameters")?;
        let array = hooks::patch_array(array.as_ref(), &self.inner.device)?;
        let action = hooks::forward_action(kind, &params, r#fn, array).map_err(to_py_err)?;
        Ok(self.inner.hooks.add_forward(point, action))
    }

    #[pyo3(signature = (point, kind, params, r#fn = None))]
    fn add_backward_hook(
        &mut self,
        point: &str,
        kind: &str,
        params: &Bound<'_, PyAny>,
        r#fn: Option<Py<PyAny>>,
    ) -> PyResult<u64> {
        Hooks::check_point(point, self.inner.blocks.len()).map_err(to_py_err)?;
        let params = from_py(params, "hook parameters")?;
        let action = hooks::backward_action(kind, &params, r#fn).map_err(to_py_err)?;
        Ok(self.inner.hooks.add_backward(point, action))
    }

    /// A gradient transform for the parameters whose names `pattern` matches.
    #[pyo3(signature = (pattern, kind, params, r#fn = None))]
    fn add_update_hook(
        &mut self,
        pattern: &str,
        kind: &str,
        params: &Bound<'_, PyAny>,
        r#fn: Option<Py<PyAny>>,
    ) -> PyResult<u64> {
        let params = from_py(params, "hook parameters")?;
        let t = hooks::update_transform(kind, &params, r#fn).map_err(to_py_err)?;
        Ok(self.inner.hooks.add_update(pattern, t))
    }

    #[pyo3(signature = (kind, weight, point = None))]
    fn add_aux_loss(&mut self, kind: &str, weight: f64, point: Option<String>) -> PyResult<u64> {
        if let Some(p) = &point {
            Hooks::check_point(p, self.inner.blocks.len()).map_err(to_py_err)?;
        }
        let loss = AuxLoss::built_in(kind, weight, point).map_err(to_py_err)?;
        Ok(self.inner.hooks.add_aux(loss))
    }

    fn remove_hook(&mut self, id: u64) -> bool {
        self.inner.hooks.remove(id)
    }

    fn clear_hooks(&mut self) {
        self.inner.hooks.clear()
    }

    /// What capture hooks recorded since the last call, as (hook id, point, value) tuples:
    /// value is an array (full captures) or a dict of statistics.
    fn take_captured<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for ((id, point), c) in self.inner.hooks.take_captured() {
            let value = match c {
                Captured::Full(t) => to_numpy(py, &t)?.into_any(),
                Captured::Stats(s) => {
                    let d = PyDict::new(py);
                    d.set_item("shape", s.shape)?;
                    d.set_item("mean", s.mean)?;
                    d.set_item("std", s.std)?;
                    d.set_item("min", s.min)?;
                    d.set_item("max", s.max)?;
                    d.set_item("absmax", s.absmax)?;
                    d.into_any()
                }
            };
            out.append((id, point, value))?;
        }
        Ok(out)
    }
}

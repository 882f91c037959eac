//! Hugging Face checkpoint folders: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, read tensor by tensor with plain file reads.

use super::names::{is_ignorable, param_specs};
use super::reader::TensorFiles;
use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::spec::ModelSpec;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{}: invalid JSON: {e}", path.display())))
}

/// The safetensors files of a folder: the shards an index names, or `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::config(
                    index.display().to_string(),
                    "weight_map",
                    "missing or not an object",
                )
            })?;
        let mut files = BTreeSet::new();
        for (tensor, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::config(
                    index.display().to_string(),
                    format!("weight_map.{tensor}"),
                    format!("expected a file name, got {f}"),
                )
            })?;
            files.insert(shard_path(dir, &index, tensor, f)?);
        }
        return Ok(files.into_iter().collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    refuse_pickled(dir)?;
    Err(Error::NotFound(dir.join("model.safetensors")))
}

/// A shard the index names: a plain file name inside the folder (no `..`, no absolute path, no
/// subfolder escaping it) that is a regular file, so a FIFO or device cannot block the load.
fn shard_path(dir: &Path, index: &Path, tensor: &str, f: &str) -> Result<PathBuf> {
    let rel = Path::new(f);
    let plain = !f.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(Error::config(
            index.display().to_string(),
            format!("weight_map.{tensor}"),
            format!("shard {f:?} must be a file name inside {}", dir.display()),
        ));
    }
    let path = dir.join(rel);
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(Error::config(
            index.display().to_string(),
            format!("weight_map.{tensor}"),
            format!("shard {} is not a regular file", path.display()),
        )),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A folder holding only pickled PyTorch weights: loading those would run code from the file.
fn refuse_pickled(dir: &Path) -> Result<()> {
    let pickled = [
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "model.pt",
        "model.pth",
    ]
    .iter()
    .map(|n| dir.join(n))
    .find(|p| p.exists());
    match pickled {
        Some(p) => Err(Error::Input(format!(
            "{}: PyTorch pickle checkpoints are not loaded (unpickling runs code from the file); \
             convert it to safetensors first, e.g. with `transformers`: \
             AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
            p.display()
        ))),
        None => Ok(()),
    }
}

/// Loads a checkpoint folder in float32. Every problem with the tensors (missing, unexpected,
/// wrong shape) is reported at once, by name.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<Decoder> {
    load_hf_folder_as(dir, device, DType::F32)
}

/// Loads a checkpoint folder with its weights in `dtype` (f32, bf16 or f16), each tensor read
/// straight onto `device` and converted there.
pub fn load_hf_folder_as(dir: &Path, device: &Device, dtype: DType) -> Result<Decoder> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Input(format!(
            "weights can be loaded as float32, bfloat16 or float16, not {dtype:?}"
        )));
    }
    if !dir.is_dir() {
        return Err(Error::NotFound(dir.to_path_buf()));
    }
    let cfg_path = dir.join("config.json");
    let config = read_json(&cfg_path)?;
    let spec = ModelSpec::from_hf_config(&config, &cfg_path.display().to_string())?;
    let files = safetensors_files(dir)?;
    for f in &files {
        if !f.exists() {
            return Err(Error::NotFound(f.clone()));
        }
    }
    let st = TensorFiles::open(&files)?;
    let in_file: BTreeSet<String> = st.names().cloned().collect();
    load_named(
        spec,
        config,
        &in_file,
        |name| st.load(name, device),
        device,
        dtype,
        &files[0].display().to_string(),
    )
}

/// Takes each expected tensor through `fetch`, converts it to the model's layout and `dtype`,
/// and collects every problem before failing.
pub fn load_named(
    spec: ModelSpec,
    config: Value,
    in_file: &BTreeSet<String>,
    fetch: impl Fn(&str) -> candle_core::Result<Tensor>,
    device: &Device,
    dtype: DType,
    context: &str,
) -> Result<Decoder> {
    // Original GPT-2 exports have no `transformer.` prefix.
    let strip = spec.architecture == crate::spec::Architecture::Gpt2
        && !in_file.iter().any(|n| n.starts_with("transformer."));
    let file_name = |name: &str| -> String {
        if strip {
            name.strip_prefix("transformer.")
                .unwrap_or(name)
                .to_string()
        } else {
            name.to_string()
        }
    };
    let mut problems = vec![];
    let mut tensors = HashMap::new();
    let mut used = BTreeSet::new();
    for p in param_specs(&spec) {
        let fname = file_name(&p.name);
        if !in_file.contains(&fname) {
            problems.push(format!(
                "missing tensor `{fname}` (expected shape {:?})",
                p.shape
            ));
            continue;
        }
        used.insert(fname.clone());
        let t = match fetch(&fname) {
            Ok(t) => t,
            Err(e) => {
                problems.push(format!("tensor `{fname}` could not be read: {e}"));
                continue;
            }
        };
        let stored: Vec<usize> = if p.conv1d {
            vec![p.shape[1], p.shape[0]]
        } else {
            p.shape.clone()
        };
        if t.dims() != stored.as_slice() {
            problems.push(format!(
                "tensor `{fname}` has shape {:?}, the config implies {:?}",
                t.dims(),
                stored
            ));
            continue;
        }
        let t = if p.conv1d { t.t()?.contiguous()? } else { t };
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        tensors.insert(p.name, t.to_device(device)?);
    }
    for name in in_file.difference(&used) {
        if !is_ignorable(name, &spec) {
            problems.push(format!("unexpected tensor `{name}`"));
        }
    }
    if !problems.is_empty() {
        return Err(Error::Weights(format!(
            "{context}: {} problem(s) with the checkpoint's tensors:\n  {}",
            problems.len(),
            problems.join("\n  ")
        )));
    }
    Decoder::from_tensors(spec, config, tensors, device)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves a
/// half-written file under the final name.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let done = write(&tmp).and_then(|()| {
        // The rename is only atomic with respect to contents that reached the disk first.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if done.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    done
}

/// Saves `config.json` and `model.safetensors` in the checkpoint's own names and layouts.
pub fn save_hf_folder(model: &Decoder, dir: &Path) -> Result<()> {
    if model.is_quantized() {
        return Err(Error::Input(format!(
            "{}: the model is quantized; save it as GGUF, or dequantize it first to write safetensors",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let specs: HashMap<String, bool> = param_specs(&model.spec)
        .into_iter()
        .map(|p| (p.name, p.conv1d))
        .collect();
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in model.parameters() {
        let t = t.detach().to_device(&Device::Cpu)?;
        let t = if specs.get(&name).copied().unwrap_or(false) {
            t.t()?.contiguous()?
        } else {
            t.contiguous()?
        };
        out.insert(name, t);
    }
    write_atomic(&dir.join("model.safetensors"), |tmp| {
        candle_core::safetensors::save(&out, tmp).map_err(Error::from)
    })?;
    let text =
        serde_json::to_string_pretty(&model.config).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join("config.json"), |tmp| {
        std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e))
    })
}

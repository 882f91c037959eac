//! GGUF files in llama.cpp's conventions: `general.*` and `{arch}.*` metadata, `blk.N.*`
//! tensor names, q/k rows permuted for the llama architecture (llama.cpp rotates interleaved
//! pairs there, Hugging Face rotates halves), and the tokenizer as `tokenizer.ggml.*` plus the
//! whole `tokenizer.json` under `tokenizer.huggingface.json`. The Hugging Face config is kept
//! under `metalcandle.config_json` so a model comes back exactly; files without it (written by
//! other tools) get a config rebuilt from the llama.cpp keys.

use crate::error::{Error, Result};
use crate::model::{Decoder, Param};
use crate::nn::{QuantizedMatrix, Weight};
use crate::spec::{Architecture, ModelSpec, Positions, RopeScaling};
use crate::weights::names::{gguf_module, param_specs, Part, Place};
use crate::weights::write_atomic;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const CONFIG_KEY: &str = "metalcandle.config_json";
const TOKENIZER_KEY: &str = "tokenizer.huggingface.json";

/// llama.cpp's architecture name: Mistral checkpoints are converted as llama.
fn gguf_arch(a: Architecture) -> &'static str {
    match a {
        Architecture::Qwen2 => "qwen2",
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Gpt2 => "gpt2",
        Architecture::Phi3 => "phi3",
        Architecture::CustomTransformer => "custom-transformer",
    }
}

/// `model.layers.0.self_attn.q_proj.weight` (at `Layer(0, Q)`) -> `blk.0.attn_q.weight`.
fn gguf_name(place: Place, hf: &str) -> String {
    let which = hf.rsplit('.').next().unwrap_or(hf);
    format!("{}.{which}", gguf_module(place))
}

/// The row order llama.cpp's llama architecture expects for q or k: within each head, the
/// rotate-half pairs (j, j + d/2) become adjacent rows (2j, 2j + 1). `inverse` undoes it.
fn rope_permutation(rows: usize, heads: usize, inverse: bool) -> Vec<usize> {
    let hd = rows / heads;
    let mut perm = vec![0; rows];
    for h in 0..heads {
        for j in 0..hd / 2 {
            for s in 0..2 {
                let (llama_cpp, hf) = (h * hd + 2 * j + s, h * hd + s * (hd / 2) + j);
                if inverse {
                    perm[hf] = llama_cpp;
                } else {
                    perm[llama_cpp] = hf;
                }
            }
        }
    }
    perm
}

/// Row i of the result is row perm[i] of `q`, copying the raw blocks (each row is whole blocks).
fn permute_rows(q: &QTensor, perm: &[usize]) -> Result<QTensor> {
    let dims = q.shape().dims().to_vec();
    let data = q.data()?;
    let row_bytes = data.len() / dims[0];
    let mut out = Vec::with_capacity(data.len());
    for &r in perm {
        out.extend_from_slice(&data[r * row_bytes..(r + 1) * row_bytes]);
    }
    let storage = QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), q.dtype())?;
    Ok(QTensor::new(storage, dims)?)
}

/// The number of heads whose rows the matrix at `place` holds, when llama.cpp permutes it.
fn permuted_heads(spec: &ModelSpec, place: Place) -> Option<usize> {
    if gguf_arch(spec.architecture) != "llama" {
        return None;
    }
    let Place::Layer(layer, part) = place else {
        return None;
    };
    let a = spec.layers.get(layer)?.attention;
    match part {
        Part::Q => Some(a.num_heads),
        Part::K => Some(a.num_kv_heads),
        _ => None,
    }
}

fn u32v(x: usize) -> Value {
    Value::U32(x as u32)
}

/// `general.*`, `{arch}.*` metadata from the spec.
fn model_metadata(spec: &ModelSpec, file_type: u32) -> Vec<(String, Value)> {
    let arch = gguf_arch(spec.architecture);
    let l0 = &spec.layers[0];
    let key = |k: &str| format!("{arch}.{k}");
    let mut md = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(spec.architecture.as_str().into()),
        ),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        (key("context_length"), u32v(spec.max_position_embeddings)),
        (key("embedding_length"), u32v(spec.hidden_size)),
        (key("block_count"), u32v(spec.layers.len())),
        (key("feed_forward_length"), u32v(l0.mlp.intermediate_size)),
        (key("attention.head_count"), u32v(l0.attention.num_heads)),
        (
            key("attention.head_count_kv"),
            u32v(l0.attention.num_kv_heads),
        ),
        (key("vocab_size"), u32v(spec.vocab_size)),
    ];
    match l0.norm.kind {
        crate::spec::NormKind::RmsNorm => md.push((
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(l0.norm.eps as f32),
        )),
        crate::spec::NormKind::LayerNorm => md.push((
            key("attention.layer_norm_epsilon"),
            Value::F32(l0.norm.eps as f32),
        )),
    }
    if let Positions::Rope { theta, scaling } = &spec.positions {
        md.push((key("rope.freq_base"), Value::F32(*theta as f32)));
        md.push((key("rope.dimension_count"), u32v(l0.attention.head_dim)));
        if let RopeScaling::Linear { factor } = scaling {
            md.push((key("rope.scaling.type"), Value::String("linear".into())));
            md.push((key("rope.scaling.factor"), Value::F32(*factor as f32)));
        }
    }
    if let Some(b) = spec.bos_token_id {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = spec.eos_token_ids.first() {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    md
}

/// llama.cpp's `general.file_type` for a model whose matrices are mostly `dtype`.
fn file_type(dtype: Option<GgmlDType>) -> u32 {
    match dtype {
        None | Some(GgmlDType::F32) => 0,
        Some(GgmlDType::F16) => 1,
        Some(GgmlDType::Q4_0) => 2,
        Some(GgmlDType::Q4_1) => 3,
        Some(GgmlDType::Q8_0) => 7,
        Some(GgmlDType::Q5_0) => 8,
        Some(GgmlDType::Q5_1) => 9,
        Some(GgmlDType::Q2K) => 10,
        Some(GgmlDType::Q3K) => 12,
        Some(GgmlDType::Q4K) => 15,
        Some(GgmlDType::Q5K) => 17,
        Some(GgmlDType::Q6K) => 18,
        Some(_) => 0,
    }
}

/// `tokenizer.ggml.*` for a byte-level BPE `tokenizer.json` (the "gpt2" tokenizer model of
/// llama.cpp); other tokenizer kinds are carried in `tokenizer.huggingface.json` only.
/// llama.cpp applies its Phi-3 vocabulary fixes to every file whose `general.name` says phi3,
/// and aborts loading when the vocabulary lacks a token they touch (a byte-level BPE
/// vocabulary has no `<s>`, `</s>` or `<unk>`); such a file goes without a name instead.
fn drop_name_llama_cpp_misreads(md: &mut Vec<(String, Value)>) {
    let text = |v: &Value| v.to_string().ok().cloned().unwrap_or_default();
    let named_phi3 = md.iter().any(|(k, v)| {
        let name = text(v).to_lowercase();
        k == "general.name" && (name.contains("phi3") || name.contains("phi-3"))
    });
    let has = |token: &str| {
        md.iter().any(|(k, v)| match v {
            Value::Array(tokens) if k == "tokenizer.ggml.tokens" => {
                tokens.iter().any(|t| text(t) == token)
            }
            _ => false,
        })
    };
    if named_phi3 && !["<s>", "</s>", "<unk>"].iter().all(|t| has(t)) {
        md.retain(|(k, _)| k != "general.name");
    }
}

fn tokenizer_metadata(spec: &ModelSpec, text: &str) -> Result<Vec<(String, Value)>> {
    let mut md = vec![(TOKENIZER_KEY.to_string(), Value::String(text.into()))];
    let tok: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::Input(format!("tokenizer.json: invalid JSON: {e}")))?;
    let model = &tok["model"];
    if model["type"] != "BPE" {
        return Ok(md);
    }
    let mut tokens: Vec<(u64, String, i32)> = vec![];
    if let Some(vocab) = model["vocab"].as_object() {
        for (t, id) in vocab {
            tokens.push((id.as_u64().unwrap_or(0), t.clone(), 1));
        }
    }
    for a in tok["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        // llama.cpp's token types: 3 control (special), 4 user-defined.
        let kind = if a["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
        tokens.retain(|(i, _, _)| *i != id);
        tokens.push((id, t.to_string(), kind));
    }
    tokens.sort_by_key(|(id, _, _)| *id);
    // llama.cpp takes the vocabulary size from the token list: pad the embedding rows the
    // tokenizer never produces, as its converter does (type 5, unused).
    for id in tokens.len()..spec.vocab_size {
        tokens.push((id as u64, format!("[PAD{id}]"), 5));
    }
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(Value::String(s.clone())),
            serde_json::Value::Array(p) => Some(Value::String(format!(
                "{} {}",
                p.first()?.as_str()?,
                p.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    let pre = match spec.architecture {
        Architecture::Qwen2 => "qwen2",
        Architecture::Gpt2 => "gpt-2",
        _ => "default",
    };
    md.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.1.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ]);
    Ok(md)
}

/// What a GGUF file carries of the tokenizer.
#[derive(Debug, Default, Clone)]
pub struct GgufTokenizer {
    /// The Hugging Face `tokenizer.json` text.
    pub json: Option<String>,
    pub chat_template: Option<String>,
    pub pad_token_id: Option<u32>,
}

/// Writes `model` (float, quantized or mixed) as one GGUF file, atomically.
pub fn save_gguf(model: &Decoder, path: &Path, tokenizer: &GgufTokenizer) -> Result<()> {
    if model.has_unmerged_adapter() {
        return Err(Error::Input(format!(
            "{}: the model has an unmerged LoRA adapter, which GGUF cannot hold: merge it \
             first (merge_adapter) or save it on its own (save_adapter)",
            path.display()
        )));
    }
    let spec = &model.spec;
    // Quantized matrices are written as ggml's blocks (candle's CPU storage as it is, our
    // interleaved layout unpacked, other devices copied); float ones as F32 block tensors.
    let mut tensors: Vec<(String, Arc<QTensor>)> = vec![];
    let mut counts: HashMap<GgmlDType, usize> = HashMap::new();
    for (place, name, p) in model.params() {
        let q = match p {
            Param::Matrix(Weight::Quantized(q)) => {
                *counts.entry(q.dtype()).or_default() += 1;
                q.to_qtensor()?
            }
            Param::Matrix(Weight::Float(t)) | Param::Tensor(t) => {
                let t = t.detach().to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                Arc::new(QTensor::quantize(&t.contiguous()?, GgmlDType::F32)?)
            }
        };
        let q = match permuted_heads(spec, place) {
            Some(heads) => Arc::new(permute_rows(
                &q,
                &rope_permutation(q.shape().dims()[0], heads, false),
            )?),
            None => q,
        };
        tensors.push((gguf_name(place, &name), q));
    }
    let main = counts.into_iter().max_by_key(|(_, c)| *c).map(|(d, _)| d);
    let mut md = model_metadata(spec, file_type(main));
    let config = serde_json::to_string(&model.config).map_err(|e| Error::Msg(e.to_string()))?;
    md.push((CONFIG_KEY.into(), Value::String(config)));
    if let Some(tok) = &tokenizer.json {
        md.extend(tokenizer_metadata(spec, tok)?);
    }
    if let Some(t) = &tokenizer.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    if let Some(id) = tokenizer.pad_token_id {
        md.push(("tokenizer.ggml.padding_token_id".into(), Value::U32(id)));
    }
    drop_name_llama_cpp_misreads(&mut md);
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_ref()))
        .collect();
    write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &md_refs, &t_refs)?;
        type_empty_arrays(&mut w, &md_refs).map_err(|e| Error::io(tmp, e))?;
        use std::io::Write;
        w.flush().map_err(|e| Error::io(tmp, e))
    })
}

/// The element type of our arrays, by key: candle writes every empty array as one of u32,
/// and llama.cpp refuses that for a string array (`invalid gguf type for
/// tokenizer.ggml.merges`, a BPE tokenizer without merges).
fn array_element_type(key: &str) -> Option<u32> {
    const STRING: u32 = 8;
    const I32: u32 = 5;
    match key {
        "tokenizer.ggml.tokens" | "tokenizer.ggml.merges" => Some(STRING),
        "tokenizer.ggml.token_type" => Some(I32),
        _ => None,
    }
}

/// Rewrites the element type of each empty array `gguf_file::write` just wrote from `md`.
fn type_empty_arrays<W: std::io::Write + std::io::Seek>(
    w: &mut W,
    md: &[(&str, &Value)],
) -> std::io::Result<()> {
    use std::io::SeekFrom;
    fn size(v: &Value) -> u64 {
        match v {
            Value::U8(_) | Value::I8(_) | Value::Bool(_) => 1,
            Value::U16(_) | Value::I16(_) => 2,
            Value::U32(_) | Value::I32(_) | Value::F32(_) => 4,
            Value::U64(_) | Value::I64(_) | Value::F64(_) => 8,
            Value::String(s) => 8 + s.len() as u64,
            Value::Array(a) => 4 + 8 + a.iter().map(size).sum::<u64>(),
        }
    }
    let end = w.stream_position()?;
    // Header: magic, version, tensor count, metadata count; then per entry the key (u64
    // length + bytes), the value type (u32) and the value (an array: element type first).
    let mut pos = 4 + 4 + 8 + 8;
    for (key, value) in md {
        let value_at = pos + 8 + key.len() as u64 + 4;
        if let (Value::Array(a), Some(t)) = (value, array_element_type(key)) {
            if a.is_empty() {
                w.seek(SeekFrom::Start(value_at))?;
                w.write_all(&t.to_le_bytes())?;
            }
        }
        pos = value_at + size(value);
    }
    w.seek(SeekFrom::Start(end))?;
    Ok(())
}

fn read_content(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    if !path.is_file() {
        return Err(Error::NotFound(path.to_path_buf()));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = super::gguf_layout::read_content(&mut f, path)?;
    Ok((content, f))
}

/// The `tokenizer.json` text a GGUF file carries, if any.
pub fn gguf_tokenizer_json(path: &Path) -> Result<Option<String>> {
    let (c, _) = read_content(path)?;
    Ok(c.metadata
        .get(TOKENIZER_KEY)
        .and_then(|v| v.to_string().ok())
        .cloned())
}

/// The metadata as JSON; arrays (vocabularies, merges) are summarised by their length.
pub fn gguf_metadata(path: &Path) -> Result<serde_json::Value> {
    let (c, _) = read_content(path)?;
    let mut out = serde_json::Map::new();
    for (k, v) in &c.metadata {
        let j = match v {
            Value::Array(a) => json!({ "array_len": a.len() }),
            // Embedded documents (tokenizer.json) would drown the rest.
            Value::String(s) if s.len() > 4096 => json!({ "string_len": s.len() }),
            Value::String(s) => json!(s),
            Value::Bool(b) => json!(b),
            Value::F32(x) => json!(x),
            Value::F64(x) => json!(x),
            Value::I8(_) | Value::I16(_) | Value::I32(_) | Value::I64(_) => {
                json!(number(v).map(|x| x as i64))
            }
            _ => json!(number(v).map(|x| x as u64)),
        };
        out.insert(k.clone(), j);
    }
    Ok(serde_json::Value::Object(out))
}

fn number(v: &Value) -> Option<f64> {
    Some(match v {
        Value::U8(x) => *x as f64,
        Value::I8(x) => *x as f64,
        Value::U16(x) => *x as f64,
        Value::I16(x) => *x as f64,
        Value::U32(x) => *x as f64,
        Value::I32(x) => *x as f64,
        Value::U64(x) => *x as f64,
        Value::I64(x) => *x as f64,
        Value::F32(x) => *x as f64,
        Value::F64(x) => *x,
        _ => return None,
    })
}

/// A Hugging Face config from llama.cpp's keys, for files other tools wrote.
fn config_from_metadata(md: &HashMap<String, Value>, path: &Path) -> Result<serde_json::Value> {
    let get = |k: &str| md.get(k);
    let arch = get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| {
            Error::config(
                path.display().to_string(),
                "general.architecture",
                "missing",
            )
        })?;
    let num = |k: &str| -> Result<f64> {
        let key = format!("{arch}.{k}");
        let v =
            get(&key).ok_or_else(|| Error::config(path.display().to_string(), &key, "missing"))?;
        number(v).ok_or_else(|| Error::config(path.display().to_string(), &key, "not a number"))
    };
    let vocab = match num("vocab_size") {
        Ok(v) => v as usize,
        Err(_) => match get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => {
                return Err(Error::config(
                    path.display().to_string(),
                    "tokenizer.ggml.tokens",
                    "missing (needed for the vocabulary size)",
                ))
            }
        },
    };
    let token_id = |k: &str| get(k).and_then(|v| v.to_u32().ok());
    let model_type = match arch.as_str() {
        "qwen2" | "llama" => arch.clone(),
        other => {
            return Err(Error::config(
                path.display().to_string(),
                "general.architecture",
                format!("`{other}` files need `{CONFIG_KEY}` (only qwen2 and llama are rebuilt from llama.cpp keys)"),
            ))
        }
    };
    Ok(json!({
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": num("embedding_length")? as usize,
        "intermediate_size": num("feed_forward_length")? as usize,
        "num_hidden_layers": num("block_count")? as usize,
        "num_attention_heads": num("attention.head_count")? as usize,
        "num_key_value_heads": num("attention.head_count_kv")? as usize,
        "max_position_embeddings": num("context_length")? as usize,
        "rms_norm_eps": num("attention.layer_norm_rms_epsilon")?,
        "rope_theta": num("rope.freq_base").unwrap_or(10000.0),
        "tie_word_embeddings": !md.contains_key("output.weight"),
        "bos_token_id": token_id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": token_id("tokenizer.ggml.eos_token_id"),
    }))
}

/// Loads a GGUF file: float tensors as float32, block-quantized ones stay quantized.
pub fn load_gguf(path: &Path, device: &Device) -> Result<Decoder> {
    let (content, mut file) = read_content(path)?;
    let mut config = match content.metadata.get(CONFIG_KEY) {
        Some(v) => serde_json::from_str(v.to_string()?)
            .map_err(|e| Error::config(path.display().to_string(), CONFIG_KEY, e.to_string()))?,
        None => config_from_metadata(&content.metadata, path)?,
    };
    if !content.metadata.contains_key(CONFIG_KEY) {
        config["tie_word_embeddings"] = json!(!content.tensor_infos.contains_key("output.weight"));
    }
    let spec = ModelSpec::from_hf_config(&config, &path.display().to_string())?;
    let mut floats: HashMap<String, Tensor> = HashMap::new();
    let mut quantized: HashMap<String, Arc<QuantizedMatrix>> = HashMap::new();
    let mut problems = vec![];
    for p in param_specs(&spec) {
        let name = gguf_name(p.place, &p.name);
        if !content.tensor_infos.contains_key(&name) {
            problems.push(format!("missing tensor `{name}` (for `{}`)", p.name));
            continue;
        }
        let q = content
            .tensor(&mut file, &name, device)
            .map_err(|e| Error::Weights(format!("{}: tensor `{name}`: {e}", path.display())))?;
        if q.shape().dims() != p.shape.as_slice() {
            problems.push(format!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                q.shape().dims(),
                p.shape
            ));
            continue;
        }
        let q = match permuted_heads(&spec, p.place) {
            Some(heads) => permute_rows(&q, &rope_permutation(p.shape[0], heads, true))?,
            None => q,
        };
        match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                floats.insert(p.name, q.dequantize(device)?);
            }
            _ => {
                // A zero-stride stand-in: the decoder is built from float tensors, then the
                // quantized matrix replaces it, so no float copy is ever allocated.
                let zero = Tensor::zeros((), DType::F32, device)?.broadcast_as(p.shape.clone())?;
                floats.insert(p.name.clone(), zero);
                // Regrouped for our kernel as it is read, so one matrix at a time is held twice.
                quantized.insert(p.name, Arc::new(QuantizedMatrix::new(q)?));
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Weights(format!(
            "{}: {}",
            path.display(),
            problems.join("; ")
        )));
    }
    let mut model = Decoder::from_tensors(spec, config, floats, device)?;
    for (name, w) in model.quantizable_mut() {
        if let Some(q) = quantized.remove(&format!("{name}.weight")) {
            *w = Weight::Quantized(q);
        }
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::quantizable_llama;

    fn logits(m: &Decoder) -> Vec<f32> {
        let ids = Tensor::new(&[[3u32, 17, 42, 8, 61]], &Device::Cpu).unwrap();
        let (l, _) = m.forward(&ids, &Default::default(), None).unwrap();
        l.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mc-gguf-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("m.gguf")
    }

    #[test]
    fn a_phi3_file_without_the_tokens_llama_cpp_fixes_goes_unnamed() {
        let md = |name: &str, tokens: &[&str]| {
            let list = tokens
                .iter()
                .map(|t| Value::String(t.to_string()))
                .collect();
            vec![
                ("general.name".to_string(), Value::String(name.into())),
                ("tokenizer.ggml.tokens".to_string(), Value::Array(list)),
            ]
        };
        let named = |mut md: Vec<(String, Value)>| {
            drop_name_llama_cpp_misreads(&mut md);
            md.iter().any(|(k, _)| k == "general.name")
        };
        assert!(!named(md("phi3", &["a", "<s>"])));
        assert!(named(md("phi3", &["<s>", "</s>", "<unk>"])));
        assert!(named(md("llama", &["a"])));
    }
    #[test]
    fn float_and_quantized_models_round_trip_exactly() {
        let mut m = quantizable_llama(false, 3);
        let path = tmp("rt");
        save_gguf(&m, &path, &GgufTokenizer::default()).unwrap();
        assert_eq!(logits(&load_gguf(&path, &Device::Cpu).unwrap()), logits(&m));
        m.quantize(&|n| {
            Some(if n.contains("mlp") {
                GgmlDType::Q4_0
            } else {
                GgmlDType::Q8_0
            })
        })
        .unwrap();
        save_gguf(&m, &path, &GgufTokenizer::default()).unwrap();
        let back = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(logits(&back), logits(&m));
        let info = back.quantization_info();
        assert_eq!(info.layers["model.layers.1.mlp.up_proj"].format, "q4_0");
        assert_eq!(info.layers["lm_head"].format, "q8_0");
    }

    #[test]
    fn phi3_with_fused_projections_round_trips_exactly() {
        let mut m = crate::testing::random_model(crate::testing::phi3_config(64, 64, 96), 3);
        let path = tmp("phi3");
        save_gguf(&m, &path, &GgufTokenizer::default()).unwrap();
        let back = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(back.spec, m.spec);
        assert_eq!(logits(&back), logits(&m));
        m.quantize(&|_| Some(GgmlDType::Q8_0)).unwrap();
        save_gguf(&m, &path, &GgufTokenizer::default()).unwrap();
        let back = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(logits(&back), logits(&m));
        let info = back.quantization_info();
        assert_eq!(
            info.layers["model.layers.1.mlp.gate_up_proj"].format,
            "q8_0"
        );
        assert_eq!(
            info.layers["model.layers.1.self_attn.qkv_proj"].format,
            "q8_0"
        );
    }

    #[test]
    fn files_without_our_config_are_rebuilt_from_llama_cpp_keys() {
        // As another tool would write it: the same tensors and llama.cpp keys, no HF config.
        let m = quantizable_llama(false, 3);
        let path = tmp("foreign");
        save_gguf(&m, &path, &GgufTokenizer::default()).unwrap();
        let (c, mut f) = read_content(&path).unwrap();
        let md: Vec<(&str, &Value)> = c
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != CONFIG_KEY)
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let tensors: Vec<(String, QTensor)> = c
            .tensor_infos
            .keys()
            .map(|k| (k.clone(), c.tensor(&mut f, k, &Device::Cpu).unwrap()))
            .collect();
        let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let foreign = path.with_file_name("foreign.gguf");
        gguf_file::write(&mut std::fs::File::create(&foreign).unwrap(), &md, &t).unwrap();
        let back = load_gguf(&foreign, &Device::Cpu).unwrap();
        let d = crate::testing::max_diff(&logits(&back), &logits(&m));
        // rms_norm_eps travels as f32 in GGUF: 1e-6 comes back as 9.9999997e-7.
        assert!(d < 1e-5, "{d}");
    }

    /// A BPE tokenizer without merges: the empty merges array is typed as strings, read from
    /// the file's bytes as the GGUF layout defines them, and the file still loads.
    #[test]
    fn empty_merges_are_written_as_a_string_array() {
        let m = quantizable_llama(false, 3);
        let path = tmp("merges");
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..64).map(|i| (format!("t{i}"), json!(i))).collect();
        let tok = json!({"model": {"type": "BPE", "vocab": vocab, "merges": []}});
        let tokenizer = GgufTokenizer {
            json: Some(tok.to_string()),
            ..Default::default()
        };
        save_gguf(&m, &path, &tokenizer).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let key = b"tokenizer.ggml.merges";
        let at = bytes
            .windows(key.len())
            .position(|w| w == key)
            .expect("merges key written")
            + key.len();
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(at), 9, "value type: array");
        assert_eq!(u32_at(at + 4), 8, "element type: string");
        assert_eq!(&bytes[at + 8..at + 16], &[0u8; 8], "length 0");
        let key = b"tokenizer.ggml.token_type";
        let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len();
        assert_eq!(
            u32_at(at + 4),
            5,
            "non-empty arrays keep their element type (i32)"
        );
        assert_eq!(logits(&load_gguf(&path, &Device::Cpu).unwrap()), logits(&m));
    }

    #[test]
    fn rope_permutation_pairs_halves_and_inverts() {
        // One head of 8 rows: HF rows (0..4 | 4..8) rotate as pairs (j, j+4).
        let p = rope_permutation(8, 1, false);
        assert_eq!(p, vec![0, 4, 1, 5, 2, 6, 3, 7]);
        let inv = rope_permutation(8, 1, true);
        let round: Vec<usize> = (0..8).map(|i| p[inv[i]]).collect();
        assert_eq!(round, (0..8).collect::<Vec<_>>());
        assert_eq!(
            rope_permutation(16, 2, false)[8..],
            [8, 12, 9, 13, 10, 14, 11, 15]
        );
    }

    #[test]
    fn tensors_take_llama_cpps_names() {
        // llama.cpp's names (its convert script's tensor map) for GPT-2, untied so the head
        // is written, and for a Llama block.
        let config = json!({
            "model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 1, "n_head": 4,
            "n_positions": 16, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": false
        });
        let spec = ModelSpec::from_hf_config(&config, "config").unwrap();
        let names: Vec<String> = param_specs(&spec)
            .iter()
            .map(|p| gguf_name(p.place, &p.name))
            .collect();
        let want = [
            "token_embd.weight",
            "position_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_norm.bias",
            "blk.0.attn_qkv.weight",
            "blk.0.attn_qkv.bias",
            "blk.0.attn_output.weight",
            "blk.0.attn_output.bias",
            "blk.0.ffn_norm.weight",
            "blk.0.ffn_norm.bias",
            "blk.0.ffn_up.weight",
            "blk.0.ffn_up.bias",
            "blk.0.ffn_down.weight",
            "blk.0.ffn_down.bias",
            "output_norm.weight",
            "output_norm.bias",
            "output.weight",
        ];
        assert_eq!(names, want);
        let block_1 = |spec: &ModelSpec| -> Vec<String> {
            param_specs(spec)
                .iter()
                .filter(|p| p.place.layer() == Some(1))
                .map(|p| gguf_name(p.place, &p.name))
                .collect()
        };
        let names = block_1(&quantizable_llama(false, 0).spec);
        let want = [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ]
        .map(|n| format!("blk.1.{n}.weight"));
        assert_eq!(names, want);
        // Phi-3: llama.cpp keeps q|k|v and gate|up fused, the latter as `ffn_up`.
        let phi3 = crate::testing::random_model(crate::testing::phi3_config(50, 32, 48), 0);
        let want: Vec<String> = "attn_norm attn_qkv attn_output ffn_norm ffn_up ffn_down"
            .split(' ')
            .map(|n| format!("blk.1.{n}.weight"))
            .collect();
        assert_eq!(block_1(&phi3.spec), want);
        assert_eq!(gguf_arch(phi3.spec.architecture), "phi3");
        assert!(param_specs(&phi3.spec)
            .iter()
            .all(|p| permuted_heads(&phi3.spec, p.place).is_none()));
    }
}

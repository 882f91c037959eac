//! `ModelSpec`: a hardware-agnostic description of a decoder-only transformer, built from a
//! Hugging Face `config.json` (qwen2, llama, mistral, gpt2, phi3) or written by hand for a model
//! trained from scratch (`custom-transformer`). Architecture differences live here and in
//! the weight names, not in separate model implementations.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    Qwen2,
    Llama,
    Mistral,
    Gpt2,
    Phi3,
    CustomTransformer,
}

impl Architecture {
    pub fn as_str(&self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Gpt2 => "gpt2",
            Architecture::Phi3 => "phi3",
            Architecture::CustomTransformer => "custom-transformer",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NormSpec {
    pub kind: NormKind,
    pub eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Silu,
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`)
    GeluTanh,
    /// exact erf form (`gelu`)
    Gelu,
    Relu,
}

impl Activation {
    pub fn from_hf(name: &str, context: &str, key: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::config(
                    context,
                    key,
                    format!("unsupported activation `{other}` (expected silu, gelu, gelu_new, gelu_pytorch_tanh or relu)"),
                ))
            }
        })
    }
}

/// Gated MLPs (`down(act(gate(x)) * up(x))`, SwiGLU when act is SiLU) or plain two-layer MLPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    Gated,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub kind: MlpKind,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub bias: bool,
    /// Phi-3 packs gate | up into one projection (`gate_up_proj`, gate rows first).
    #[serde(default)]
    pub fused_gate_up: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    Rope { theta: f64, scaling: RopeScaling },
    Learned,
    Sinusoidal,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Query i sees keys j with i - window < j <= i (the window counts the query itself).
    pub sliding_window: Option<usize>,
    /// GPT-2 (`c_attn`) and Phi-3 (`qkv_proj`) pack q|k|v into one projection.
    pub fused_qkv: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpec {
    pub attention: AttentionSpec,
    pub mlp: MlpSpec,
    pub norm: NormSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub max_position_embeddings: usize,
    pub positions: Positions,
    pub layers: Vec<LayerSpec>,
    pub final_norm: NormSpec,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Dropout rate while training, at the embedding output, the attention probabilities and
    /// both residual branches (GPT-2's and nanoGPT's places). Only a from-scratch spec sets
    /// it: a Hugging Face checkpoint's own dropout fields are not applied, so fine-tuning one
    /// follows the deterministic trajectory (PEFT's with dropout 0).
    #[serde(default)]
    pub dropout: f64,
}

impl ModelSpec {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Builds the spec from a parsed Hugging Face `config.json`. `context` names the file in errors.
    pub fn from_hf_config(cfg: &Value, context: &str) -> Result<Self> {
        let c = Cfg { v: cfg, context };
        let model_type = c.req_str("model_type")?;
        match model_type {
            "qwen2" => llama_family(&c, Architecture::Qwen2),
            "llama" => llama_family(&c, Architecture::Llama),
            "mistral" => llama_family(&c, Architecture::Mistral),
            "gpt2" => gpt2(&c),
            "phi3" => llama_family(&c, Architecture::Phi3),
            "custom-transformer" => {
                let custom: CustomSpec = serde_json::from_value(cfg.clone()).map_err(|e| {
                    Error::config(context, "custom-transformer", format!("invalid spec: {e}"))
                })?;
                custom.to_spec(context)
            }
            other => Err(Error::config(
                context,
                "model_type",
                format!("unsupported architecture `{other}` (supported: qwen2, llama, mistral, gpt2, phi3, custom-transformer)"),
            )),
        }
    }

    /// Checks the internal consistency that every constructor must guarantee.
    pub fn validate(&self, context: &str) -> Result<()> {
        if self.vocab_size == 0 {
            return Err(Error::config(context, "vocab_size", "must be > 0"));
        }
        if self.layers.is_empty() {
            return Err(Error::config(context, "num_hidden_layers", "must be > 0"));
        }
        // A zero size makes every tensor it spans empty, so a checkpoint of empty tensors
        // would match any other size, and the rotary tables are sized by head_dim alone.
        if self.hidden_size == 0 {
            return Err(Error::config(context, "hidden_size", "must be > 0"));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let a = &l.attention;
            if a.head_dim == 0 {
                return Err(Error::config(
                    context,
                    "head_dim",
                    format!("layer {i}: must be > 0"),
                ));
            }
            if l.mlp.intermediate_size == 0 {
                return Err(Error::config(
                    context,
                    "intermediate_size",
                    format!("layer {i}: must be > 0"),
                ));
            }
            // The projections' row counts, which the tensor names and shapes are built from
            // unchecked (weights::names::param_specs).
            let q = a.num_heads.checked_mul(a.head_dim);
            let kv = a.num_kv_heads.checked_mul(a.head_dim);
            let qkv = q
                .zip(kv)
                .and_then(|(q, kv)| kv.checked_mul(2).and_then(|kv| q.checked_add(kv)));
            if qkv.is_none() {
                return Err(Error::config(
                    context,
                    "head_dim",
                    format!(
                        "layer {i}: {} heads of {} dimensions overflow",
                        a.num_heads, a.head_dim
                    ),
                ));
            }
            if a.num_heads == 0 || a.num_kv_heads == 0 || a.num_heads % a.num_kv_heads != 0 {
                return Err(Error::config(
                    context,
                    "num_key_value_heads",
                    format!(
                        "layer {i}: num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                        a.num_heads, a.num_kv_heads
                    ),
                ));
            }
            if matches!(self.positions, Positions::Rope { .. }) && a.head_dim % 2 != 0 {
                return Err(Error::config(
                    context,
                    "head_dim",
                    format!(
                        "layer {i}: rotary embeddings need an even head_dim, got {}",
                        a.head_dim
                    ),
                ));
            }
            if a.sliding_window == Some(0) {
                return Err(Error::config(context, "sliding_window", "must be > 0"));
            }
            if l.mlp.fused_gate_up && l.mlp.kind != MlpKind::Gated {
                return Err(Error::config(
                    context,
                    "mlp",
                    format!("layer {i}: a fused gate|up projection needs a gated MLP"),
                ));
            }
        }
        let params = crate::weights::names::param_specs(self)
            .iter()
            .try_fold(0usize, |n, p| {
                n.checked_add(crate::limits::elem_count(&p.shape)?)
            });
        if params.is_none() {
            return Err(Error::config(
                context,
                "vocab_size",
                "the parameter count overflows (vocab_size, hidden_size or a layer size is too large)",
            ));
        }
        Ok(())
    }
}

/// Typed access to a JSON config with errors that name the key.
struct Cfg<'a> {
    v: &'a Value,
    context: &'a str,
}

impl<'a> Cfg<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.context, key, msg)
    }
    fn req_str(&self, key: &str) -> Result<&'a str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.err(key, format!("expected a string, got {other}"))),
            None => Err(self.err(key, "missing")),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {v}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }
    fn token_ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(key, "expected a token id")),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| self.err(key, "expected token ids"))
                })
                .collect(),
            Some(v) => Err(self.err(
                key,
                format!("expected a token id or a list of them, got {v}"),
            )),
        }
    }
}

fn rope_from_hf(c: &Cfg) -> Result<Positions> {
    // transformers 5 nests RoPE settings in `rope_parameters`; older configs use
    // top-level `rope_theta` and `rope_scaling`.
    let params = c.get("rope_parameters").or_else(|| c.get("rope_scaling"));
    let theta = match params
        .and_then(|p| p.get("rope_theta"))
        .and_then(|t| t.as_f64())
    {
        Some(t) => t,
        None => c.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let scaling = match params {
        None => RopeScaling::Default,
        Some(p) => {
            let key = if c.get("rope_parameters").is_some() {
                "rope_parameters"
            } else {
                "rope_scaling"
            };
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            let num = |k: &str| -> Result<f64> {
                p.get(k)
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| c.err(&format!("{key}.{k}"), "missing or not a number"))
            };
            match kind {
                "default" => RopeScaling::Default,
                "linear" => RopeScaling::Linear {
                    factor: num("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?
                        as usize,
                },
                other => {
                    return Err(c.err(
                        &format!("{key}.rope_type"),
                        format!(
                        "unsupported RoPE scaling `{other}` (supported: default, linear, llama3)"
                    ),
                    ))
                }
            }
        }
    };
    if theta <= 0.0 {
        return Err(c.err("rope_theta", "must be > 0"));
    }
    Ok(Positions::Rope { theta, scaling })
}

fn llama_family(c: &Cfg, arch: Architecture) -> Result<ModelSpec> {
    let phi3 = arch == Architecture::Phi3;
    if phi3 {
        // Phi-3 rotates only the first `partial_rotary_factor` of each head; the rotary tables
        // here span the whole head.
        let params = c.get("rope_parameters").or_else(|| c.get("rope_scaling"));
        let (key, factor) = match params.and_then(|p| p.get("partial_rotary_factor")) {
            Some(f) => ("rope_parameters.partial_rotary_factor", Some(f)),
            None => ("partial_rotary_factor", c.get("partial_rotary_factor")),
        };
        if let Some(f) = factor {
            if f.as_f64() != Some(1.0) {
                return Err(c.err(
                    key,
                    format!("is {f}; only 1.0 (rotary positions over the whole head) is supported"),
                ));
            }
        }
    }
    let hidden = c.req_usize("hidden_size")?;
    let n_layers = crate::limits::check_layers(
        c.context,
        "num_hidden_layers",
        c.req_usize("num_hidden_layers")?,
    )?;
    let n_heads = c.req_usize("num_attention_heads")?;
    let n_kv = c.opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
    if n_heads == 0 {
        return Err(c.err("num_attention_heads", "must be > 0"));
    }
    let head_dim = match c.opt_usize("head_dim")? {
        Some(d) => d,
        None => {
            if hidden % n_heads != 0 {
                return Err(c.err(
                    "head_dim",
                    format!("missing, and hidden_size ({hidden}) is not divisible by num_attention_heads ({n_heads})"),
                ));
            }
            hidden / n_heads
        }
    };
    let eps = c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6);
    let act = Activation::from_hf(
        c.get("hidden_act")
            .and_then(|v| v.as_str())
            .unwrap_or("silu"),
        c.context,
        "hidden_act",
    )?;
    // Phi-3's projections have no biases whatever the config says (it has no such keys).
    let qkv_bias = match arch {
        Architecture::Qwen2 => true,
        Architecture::Phi3 => false,
        _ => c.opt_bool("attention_bias")?.unwrap_or(false),
    };
    let o_bias = arch != Architecture::Qwen2 && qkv_bias;
    let mlp_bias = !phi3 && c.opt_bool("mlp_bias")?.unwrap_or(false);

    let window = c.opt_usize("sliding_window")?;
    let windowed: Vec<bool> = match arch {
        // Phi-3's attention applies `sliding_window` whenever the config sets it, as Mistral's.
        Architecture::Mistral | Architecture::Phi3 => vec![window.is_some(); n_layers],
        Architecture::Qwen2 => {
            let use_sw = c.opt_bool("use_sliding_window")?.unwrap_or(false);
            match c.get("layer_types").and_then(|v| v.as_array()) {
                Some(types) => {
                    if types.len() != n_layers {
                        return Err(c.err(
                            "layer_types",
                            format!(
                                "has {} entries but num_hidden_layers is {n_layers}",
                                types.len()
                            ),
                        ));
                    }
                    types
                        .iter()
                        .map(|t| t.as_str() == Some("sliding_attention") && use_sw)
                        .collect()
                }
                None => {
                    let max_window_layers = c.opt_usize("max_window_layers")?.unwrap_or(n_layers);
                    (0..n_layers)
                        .map(|i| use_sw && i >= max_window_layers)
                        .collect()
                }
            }
        }
        _ => vec![false; n_layers],
    };
    if windowed.iter().any(|&w| w) && window.is_none() {
        return Err(c.err(
            "sliding_window",
            "sliding attention is enabled but `sliding_window` is missing",
        ));
    }

    let intermediate_size = c.req_usize("intermediate_size")?;
    let layers = windowed
        .iter()
        .map(|&w| LayerSpec {
            attention: AttentionSpec {
                num_heads: n_heads,
                num_kv_heads: n_kv,
                head_dim,
                qkv_bias,
                o_bias,
                sliding_window: if w { window } else { None },
                fused_qkv: phi3,
            },
            mlp: MlpSpec {
                kind: MlpKind::Gated,
                intermediate_size,
                activation: act,
                bias: mlp_bias,
                fused_gate_up: phi3,
            },
            norm: NormSpec {
                kind: NormKind::RmsNorm,
                eps,
            },
        })
        .collect();

    let spec = ModelSpec {
        architecture: arch,
        vocab_size: c.req_usize("vocab_size")?,
        hidden_size: hidden,
        max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(4096),
        positions: rope_from_hf(c)?,
        layers,
        final_norm: NormSpec {
            kind: NormKind::RmsNorm,
            eps,
        },
        tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: c.token_ids("eos_token_id")?,
        dropout: 0.0,
    };
    spec.validate(c.context)?;
    Ok(spec)
}

fn gpt2(c: &Cfg) -> Result<ModelSpec> {
    let hidden = c.req_usize("n_embd")?;
    let n_heads = c.req_usize("n_head")?;
    if n_heads == 0 || hidden % n_heads != 0 {
        return Err(c.err(
            "n_head",
            format!("n_embd ({hidden}) must be divisible by n_head ({n_heads})"),
        ));
    }
    let eps = c.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5);
    let act = Activation::from_hf(
        c.get("activation_function")
            .and_then(|v| v.as_str())
            .unwrap_or("gelu_new"),
        c.context,
        "activation_function",
    )?;
    if c.opt_bool("scale_attn_by_inverse_layer_idx")? == Some(true) {
        return Err(c.err("scale_attn_by_inverse_layer_idx", "true is not supported"));
    }
    let layer = LayerSpec {
        attention: AttentionSpec {
            num_heads: n_heads,
            num_kv_heads: n_heads,
            head_dim: hidden / n_heads,
            qkv_bias: true,
            o_bias: true,
            sliding_window: None,
            fused_qkv: true,
        },
        mlp: MlpSpec {
            kind: MlpKind::Plain,
            intermediate_size: match c.opt_usize("n_inner")? {
                Some(n) => n,
                None => hidden
                    .checked_mul(4)
                    .ok_or_else(|| c.err("n_embd", format!("{hidden} is too large")))?,
            },
            activation: act,
            bias: true,
            fused_gate_up: false,
        },
        norm: NormSpec {
            kind: NormKind::LayerNorm,
            eps,
        },
    };
    let spec = ModelSpec {
        architecture: Architecture::Gpt2,
        vocab_size: c.req_usize("vocab_size")?,
        hidden_size: hidden,
        max_position_embeddings: c.req_usize("n_positions")?,
        positions: Positions::Learned,
        layers: vec![
            layer;
            crate::limits::check_layers(c.context, "n_layer", c.req_usize("n_layer")?)?
        ],
        final_norm: NormSpec {
            kind: NormKind::LayerNorm,
            eps,
        },
        tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: c.token_ids("eos_token_id")?,
        dropout: 0.0,
    };
    spec.validate(c.context)?;
    Ok(spec)
}

/// The hand-written spec of a model trained from scratch, as stored in its `config.json`
/// (`"model_type": "custom-transformer"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomSpec {
    #[serde(default = "custom_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    pub d_ff: usize,
    pub max_seq_len: usize,
    /// "layernorm" or "rmsnorm"
    #[serde(default = "default_norm")]
    pub norm: String,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// "gelu" (exact), "gelu_tanh", "swiglu", "relu"
    #[serde(default = "default_mlp")]
    pub mlp: String,
    /// "learned", "sinusoidal" or "rope"
    #[serde(default = "default_positions")]
    pub positions: String,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    #[serde(default = "default_true")]
    pub bias: bool,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Layers that differ from the rest, applied in order (a later entry wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_overrides: Vec<LayerOverride>,
}

/// Which layers an override applies to: an index, a list of indices, or a Python-style slice
/// `"start:stop:step"` (each part optional, negative counting from the end), e.g. `"0::4"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelector {
    One(usize),
    Many(Vec<usize>),
    Slice(String),
}

impl LayerSelector {
    /// The selected layer indices of a model of `n` layers, or why the selector is wrong.
    pub fn indices(&self, n: usize) -> std::result::Result<Vec<usize>, String> {
        let check = |i: usize| {
            if i < n {
                Ok(i)
            } else {
                Err(format!(
                    "layer {i} is out of range (the model has {n} layers)"
                ))
            }
        };
        match self {
            LayerSelector::One(i) => Ok(vec![check(*i)?]),
            LayerSelector::Many(v) => v.iter().map(|&i| check(i)).collect(),
            LayerSelector::Slice(text) => slice_indices(text, n),
        }
    }
}

fn slice_indices(text: &str, n: usize) -> std::result::Result<Vec<usize>, String> {
    let bad = || format!("\"{text}\" is not a slice like \"0::4\" or \"2:6\"");
    let parts: Vec<&str> = text.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let num = |p: &str| -> std::result::Result<Option<i64>, String> {
        let p = p.trim();
        if p.is_empty() {
            Ok(None)
        } else {
            p.parse::<i64>().map(Some).map_err(|_| bad())
        }
    };
    let step = match parts.get(2) {
        Some(p) => num(p)?.unwrap_or(1),
        None => 1,
    };
    if step <= 0 {
        return Err(format!("\"{text}\": the step must be > 0"));
    }
    let n = n as i64;
    let clamp = |v: Option<i64>, default: i64| match v {
        None => default,
        Some(v) if v < 0 => (v + n).max(0),
        Some(v) => v.min(n),
    };
    let (start, stop) = (clamp(num(parts[0])?, 0), clamp(num(parts[1])?, n));
    Ok((start..stop)
        .step_by(step as usize)
        .map(|i| i as usize)
        .collect())
}

/// Keys a layer may change; `None` keeps the model-wide value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerOverride {
    pub layers: LayerSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_ff: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<usize>,
}

fn custom_model_type() -> String {
    "custom-transformer".into()
}
fn default_norm() -> String {
    "layernorm".into()
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_mlp() -> String {
    "gelu".into()
}
fn default_positions() -> String {
    "learned".into()
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_true() -> bool {
    true
}

impl CustomSpec {
    pub fn to_spec(&self, context: &str) -> Result<ModelSpec> {
        let err = |k: &str, m: String| Error::config(context, k, m);
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(err(
                "n_heads",
                format!(
                    "d_model ({}) must be divisible by n_heads ({})",
                    self.d_model, self.n_heads
                ),
            ));
        }
        let norm = match self.norm.as_str() {
            "layernorm" => NormKind::LayerNorm,
            "rmsnorm" => NormKind::RmsNorm,
            o => {
                return Err(err(
                    "norm",
                    format!("expected \"layernorm\" or \"rmsnorm\", got \"{o}\""),
                ))
            }
        };
        let (kind, activation) = match self.mlp.as_str() {
            "gelu" => (MlpKind::Plain, Activation::Gelu),
            "gelu_tanh" => (MlpKind::Plain, Activation::GeluTanh),
            "relu" => (MlpKind::Plain, Activation::Relu),
            "swiglu" => (MlpKind::Gated, Activation::Silu),
            o => {
                return Err(err(
                    "mlp",
                    format!(
                        "expected \"gelu\", \"gelu_tanh\", \"relu\" or \"swiglu\", got \"{o}\""
                    ),
                ))
            }
        };
        let positions = match self.positions.as_str() {
            "learned" => Positions::Learned,
            "sinusoidal" => Positions::Sinusoidal,
            "rope" => Positions::Rope {
                theta: self.rope_theta,
                scaling: RopeScaling::Default,
            },
            o => {
                return Err(err(
                    "positions",
                    format!("expected \"learned\", \"sinusoidal\" or \"rope\", got \"{o}\""),
                ))
            }
        };
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(err(
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        let n_kv = self.n_kv_heads.unwrap_or(self.n_heads);
        let layer = LayerSpec {
            attention: AttentionSpec {
                num_heads: self.n_heads,
                num_kv_heads: n_kv,
                head_dim: self.d_model / self.n_heads,
                qkv_bias: self.bias,
                o_bias: self.bias,
                sliding_window: None,
                fused_qkv: false,
            },
            mlp: MlpSpec {
                kind,
                intermediate_size: self.d_ff,
                activation,
                bias: self.bias,
                fused_gate_up: false,
            },
            norm: NormSpec {
                kind: norm,
                eps: self.norm_eps,
            },
        };
        let mut layers =
            vec![layer; crate::limits::check_layers(context, "n_layers", self.n_layers)?];
        for (k, o) in self.layer_overrides.iter().enumerate() {
            let key = |name: &str| format!("layer_overrides[{k}].{name}");
            let selected = o
                .layers
                .indices(self.n_layers)
                .map_err(|m| err(&key("layers"), m))?;
            for i in selected {
                let l = &mut layers[i];
                if let Some(w) = o.sliding_window {
                    l.attention.sliding_window = Some(w);
                }
                if let Some(ff) = o.d_ff {
                    l.mlp.intermediate_size = ff;
                }
                let heads = o.n_heads.unwrap_or(l.attention.num_heads);
                // An MHA model stays MHA when a layer changes its head count.
                let kv = match (o.n_kv_heads, o.n_heads) {
                    (Some(kv), _) => kv,
                    (None, Some(_)) if n_kv == self.n_heads => heads,
                    _ => l.attention.num_kv_heads,
                };
                if heads == 0 || !self.d_model.is_multiple_of(heads) {
                    return Err(err(
                        &key("n_heads"),
                        format!(
                            "d_model ({}) must be divisible by n_heads ({heads})",
                            self.d_model
                        ),
                    ));
                }
                if kv == 0 || heads % kv != 0 {
                    return Err(err(
                        &key("n_kv_heads"),
                        format!("n_heads ({heads}) must be divisible by n_kv_heads ({kv})"),
                    ));
                }
                l.attention.num_heads = heads;
                l.attention.num_kv_heads = kv;
                l.attention.head_dim = self.d_model / heads;
            }
        }
        let spec = ModelSpec {
            architecture: Architecture::CustomTransformer,
            vocab_size: self.vocab_size,
            hidden_size: self.d_model,
            max_position_embeddings: self.max_seq_len,
            positions,
            layers,
            final_norm: NormSpec {
                kind: norm,
                eps: self.norm_eps,
            },
            tie_word_embeddings: self.tie_embeddings,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.into_iter().collect(),
            dropout: self.dropout,
        };
        spec.validate(context)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn qwen_cfg() -> Value {
        json!({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 160, "vocab_size": 400, "rms_norm_eps": 1e-6,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": true,
               "sliding_window": 4096, "use_sliding_window": false, "max_window_layers": 1})
    }

    #[test]
    fn qwen2_has_qkv_bias_and_no_window_unless_enabled() {
        let s = ModelSpec::from_hf_config(&qwen_cfg(), "config.json").unwrap();
        assert!(s.layers[0].attention.qkv_bias && !s.layers[0].attention.o_bias);
        assert!(s
            .layers
            .iter()
            .all(|l| l.attention.sliding_window.is_none()));
        assert_eq!(
            s.positions,
            Positions::Rope {
                theta: 1e6,
                scaling: RopeScaling::Default
            }
        );
        let mut c = qwen_cfg();
        c["use_sliding_window"] = json!(true);
        let s = ModelSpec::from_hf_config(&c, "config.json").unwrap();
        // Layers from max_window_layers on use the window.
        assert_eq!(s.layers[0].attention.sliding_window, None);
        assert_eq!(s.layers[1].attention.sliding_window, Some(4096));
    }

    #[test]
    fn phi3_fuses_qkv_and_gate_up_and_refuses_partial_rotary() {
        let cfg = json!({"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
               "vocab_size": 400, "rms_norm_eps": 1e-5, "hidden_act": "silu",
               "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                   "partial_rotary_factor": 1.0},
               "sliding_window": null, "tie_word_embeddings": false,
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": null});
        let s = ModelSpec::from_hf_config(&cfg, "config.json").unwrap();
        assert_eq!(s.architecture, Architecture::Phi3);
        assert_eq!(s.architecture.as_str(), "phi3");
        for l in &s.layers {
            let a = l.attention;
            assert!(a.fused_qkv && !a.qkv_bias && !a.o_bias && a.sliding_window.is_none());
            assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim), (4, 2, 16));
            assert!(l.mlp.fused_gate_up && l.mlp.kind == MlpKind::Gated && !l.mlp.bias);
            assert_eq!(l.mlp.intermediate_size, 96);
            assert_eq!(l.norm.kind, NormKind::RmsNorm);
        }
        assert!(!s.tie_word_embeddings);
        let mut c = cfg.clone();
        c["sliding_window"] = json!(8);
        let s = ModelSpec::from_hf_config(&c, "config.json").unwrap();
        assert!(s
            .layers
            .iter()
            .all(|l| l.attention.sliding_window == Some(8)));
        let refused = |rope: Value, key: &str, what: &str| {
            let mut c = cfg.clone();
            c["rope_parameters"] = rope;
            let e = ModelSpec::from_hf_config(&c, "x/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("x/config.json") && e.contains(key) && e.contains(what),
                "{e}"
            );
        };
        refused(
            json!({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
            "rope_parameters.partial_rotary_factor",
            "0.5",
        );
        refused(
            json!({"rope_type": "longrope", "rope_theta": 1e4}),
            "rope_parameters.rope_type",
            "longrope",
        );
    }

    #[test]
    fn missing_and_bad_keys_are_named() {
        let mut c = qwen_cfg();
        c.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelSpec::from_hf_config(&c, "x/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x/config.json") && e.contains("hidden_size") && e.contains("missing"),
            "{e}"
        );
        let mut c = qwen_cfg();
        c["num_key_value_heads"] = json!(3);
        let e = ModelSpec::from_hf_config(&c, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
        let e = ModelSpec::from_hf_config(&json!({"model_type": "bert"}), "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_type") && e.contains("bert"), "{e}");
    }

    #[test]
    fn custom_spec_round_trips_through_json() {
        let custom = CustomSpec {
            model_type: custom_model_type(),
            vocab_size: 100,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: None,
            d_ff: 64,
            max_seq_len: 64,
            norm: "layernorm".into(),
            norm_eps: 1e-5,
            mlp: "gelu".into(),
            positions: "sinusoidal".into(),
            rope_theta: 1e4,
            tie_embeddings: true,
            bias: true,
            dropout: 0.0,
            bos_token_id: None,
            eos_token_id: None,
            layer_overrides: vec![],
        };
        let v = serde_json::to_value(&custom).unwrap();
        let s = ModelSpec::from_hf_config(&v, "config.json").unwrap();
        assert_eq!(s.positions, Positions::Sinusoidal);
        assert_eq!(s.layers[0].mlp.activation, Activation::Gelu);
        let mut bad = v.clone();
        bad["norm"] = json!("batchnorm");
        let e = ModelSpec::from_hf_config(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`norm`"), "{e}");
    }

    #[test]
    fn layer_overrides_select_layers_like_python_slices() {
        let sel = |s: &str| LayerSelector::Slice(s.into()).indices(10);
        assert_eq!(sel("0::4").unwrap(), vec![0, 4, 8]);
        assert_eq!(sel("2:6").unwrap(), vec![2, 3, 4, 5]);
        assert_eq!(sel("-2:").unwrap(), vec![8, 9]);
        assert_eq!(sel("::3").unwrap(), (0..10).step_by(3).collect::<Vec<_>>());
        assert!(sel("0::0").is_err() && sel("a:b").is_err() && sel("1").is_err());
        assert!(LayerSelector::Many(vec![1, 10]).indices(10).is_err());
        let cfg = json!({"model_type": "custom-transformer", "vocab_size": 50, "d_model": 32,
            "n_layers": 8, "n_heads": 4, "d_ff": 64, "max_seq_len": 64, "positions": "rope",
            "layer_overrides": [{"layers": "0::4", "sliding_window": 16},
                                {"layers": [1, 2], "d_ff": 96, "n_heads": 8, "n_kv_heads": 2}]});
        let s = ModelSpec::from_hf_config(&cfg, "config.json").unwrap();
        let windows: Vec<_> = s
            .layers
            .iter()
            .map(|l| l.attention.sliding_window)
            .collect();
        assert_eq!(
            windows,
            [Some(16), None, None, None, Some(16), None, None, None]
        );
        assert_eq!(s.layers[1].mlp.intermediate_size, 96);
        assert_eq!(
            (
                s.layers[2].attention.num_heads,
                s.layers[2].attention.num_kv_heads
            ),
            (8, 2)
        );
        assert_eq!(s.layers[2].attention.head_dim, 4);
        assert_eq!(s.layers[3].mlp.intermediate_size, 64);
        // Stored back as written, so a saved config.json reloads the same spec.
        let custom: CustomSpec = serde_json::from_value(cfg.clone()).unwrap();
        let again = serde_json::to_value(&custom).unwrap();
        assert_eq!(ModelSpec::from_hf_config(&again, "config.json").unwrap(), s);
        let mut bad = cfg.clone();
        bad["layer_overrides"][1]["n_heads"] = json!(5);
        let e = ModelSpec::from_hf_config(&bad, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("layer_overrides[1].n_heads") && e.contains("divisible"),
            "{e}"
        );
    }

    /// Found by fuzzing (fuzz/rust/regressions/from_config/): sizes whose products overflow
    /// panicked while the spec was built or its tensors named, and a hidden size of 0 with a
    /// huge head_dim passed every size check (its tensors are all empty) and then allocated
    /// rotary tables of head_dim / 2 floats.
    #[test]
    fn sizes_that_overflow_or_are_zero_are_refused_by_name() {
        let err = |cfg: Value| {
            ModelSpec::from_hf_config(&cfg, "x/config.json")
                .unwrap_err()
                .to_string()
        };
        let e = err(
            json!({"model_type": "gpt2", "n_embd": 1u64 << 62, "n_head": 1, "n_layer": 1,
                           "vocab_size": 2, "n_positions": 4}),
        );
        assert!(e.contains("x/config.json") && e.contains("n_embd"), "{e}");
        let e = err(
            json!({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 1u64 << 32, "head_dim": 1u64 << 32,
                           "intermediate_size": 8, "vocab_size": 2}),
        );
        assert!(e.contains("head_dim") && e.contains("overflow"), "{e}");
        let e = err(
            json!({"model_type": "llama", "hidden_size": 1u64 << 40, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "intermediate_size": 1u64 << 40,
                           "vocab_size": 1u64 << 40}),
        );
        assert!(e.contains("vocab_size") && e.contains("overflows"), "{e}");
        let e = err(
            json!({"model_type": "llama", "hidden_size": 0, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "head_dim": 1u64 << 40,
                           "intermediate_size": 8, "vocab_size": 2}),
        );
        assert!(e.contains("`hidden_size`") && e.contains("> 0"), "{e}");
        let e = err(
            json!({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "head_dim": 0, "intermediate_size": 8,
                           "vocab_size": 2}),
        );
        assert!(e.contains("`head_dim`") && e.contains("> 0"), "{e}");
        let mut c = qwen_cfg();
        c["intermediate_size"] = json!(0);
        assert!(err(c).contains("`intermediate_size`"));
    }
}

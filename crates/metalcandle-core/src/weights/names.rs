//! Module and tensor names and shapes per architecture: the single description of which
//! modules (and so which parameters) a spec implies.

use crate::spec::{Architecture, MlpKind, ModelSpec, NormKind, NormSpec, Positions};

/// Where a module sits in the decoder, whatever a checkpoint calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    Embed,
    /// Learned positions only.
    PosEmbed,
    Layer(usize, Part),
    FinalNorm,
    /// Absent when tied to the token embedding.
    LmHead,
}

/// A module of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    AttnNorm,
    Q,
    K,
    V,
    /// q | k | v in one projection (GPT-2, Phi-3).
    Qkv,
    O,
    MlpNorm,
    Gate,
    Up,
    /// gate | up in one projection (Phi-3).
    GateUp,
    Down,
}

impl Place {
    /// The block index of a module inside a block.
    pub fn layer(self) -> Option<usize> {
        match self {
            Place::Layer(i, _) => Some(i),
            _ => None,
        }
    }
}

/// What a module holds, sized by the spec.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModuleKind {
    Embedding {
        rows: usize,
        dim: usize,
    },
    /// A LayerNorm has a bias, an RMSNorm does not.
    Norm {
        dim: usize,
        spec: NormSpec,
    },
    /// `conv1d`: stored transposed ([in, out]) in the checkpoint (GPT-2's Conv1D).
    Linear {
        out: usize,
        inp: usize,
        bias: bool,
        conv1d: bool,
    },
}

/// One module the spec implies.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub place: Place,
    /// Module path as in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub kind: ModuleKind,
}

/// What a parameter is, which decides its initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Embedding,
    Weight,
    Bias,
    NormWeight,
    NormBias,
}

impl Role {
    pub fn is_bias(self) -> bool {
        matches!(self, Role::Bias | Role::NormBias)
    }
}

#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// `{module}.weight` or `{module}.bias`.
    pub name: String,
    /// The place of the module it belongs to.
    pub place: Place,
    /// Shape in the model's layout ([out, in] for linears).
    pub shape: Vec<usize>,
    /// Stored transposed ([in, out]) in the checkpoint (GPT-2's Conv1D).
    pub conv1d: bool,
    pub role: Role,
}

/// A parameter's checkpoint name: `which` is `weight` or `bias`.
pub fn param_name(module: &str, which: &str) -> String {
    format!("{module}.{which}")
}

impl ModuleSpec {
    /// The module's parameters: the weight, then the bias if it has one.
    pub fn params(&self) -> Vec<ParamSpec> {
        let param = |which: &str, shape: Vec<usize>, conv1d: bool, role: Role| ParamSpec {
            name: param_name(&self.name, which),
            place: self.place,
            shape,
            conv1d,
            role,
        };
        match self.kind {
            ModuleKind::Embedding { rows, dim } => {
                vec![param("weight", vec![rows, dim], false, Role::Embedding)]
            }
            ModuleKind::Norm { dim, spec } => {
                let mut out = vec![param("weight", vec![dim], false, Role::NormWeight)];
                if spec.kind == NormKind::LayerNorm {
                    out.push(param("bias", vec![dim], false, Role::NormBias));
                }
                out
            }
            ModuleKind::Linear {
                out,
                inp,
                bias,
                conv1d,
            } => {
                let mut params = vec![param("weight", vec![out, inp], conv1d, Role::Weight)];
                if bias {
                    params.push(param("bias", vec![out], false, Role::Bias));
                }
                params
            }
        }
    }
}

/// The names of the module at a place: in Hugging Face's Llama-family checkpoints, in GPT-2's
/// (inside a block, relative to the block's prefix), and llama.cpp's in GGUF files. None where a
/// convention has no such module: the spec parser gives GPT-2 a fused q|k|v and a plain MLP, and
/// no GPT-2 a fused gate|up, so those are never asked for.
fn names(place: Place) -> (Option<&'static str>, Option<&'static str>, &'static str) {
    use Part::*;
    match place {
        Place::Embed => (
            Some("model.embed_tokens"),
            Some("transformer.wte"),
            "token_embd",
        ),
        Place::PosEmbed => (
            Some("model.embed_positions"),
            Some("transformer.wpe"),
            "position_embd",
        ),
        Place::FinalNorm => (Some("model.norm"), Some("transformer.ln_f"), "output_norm"),
        Place::LmHead => (Some("lm_head"), Some("lm_head"), "output"),
        Place::Layer(_, part) => match part {
            AttnNorm => (Some("input_layernorm"), Some("ln_1"), "attn_norm"),
            Q => (Some("self_attn.q_proj"), None, "attn_q"),
            K => (Some("self_attn.k_proj"), None, "attn_k"),
            V => (Some("self_attn.v_proj"), None, "attn_v"),
            Qkv => (Some("self_attn.qkv_proj"), Some("attn.c_attn"), "attn_qkv"),
            O => (Some("self_attn.o_proj"), Some("attn.c_proj"), "attn_output"),
            MlpNorm => (Some("post_attention_layernorm"), Some("ln_2"), "ffn_norm"),
            Gate => (Some("mlp.gate_proj"), None, "ffn_gate"),
            Up => (Some("mlp.up_proj"), Some("mlp.c_fc"), "ffn_up"),
            // llama.cpp keeps Phi-3's gate | up fused under the up projection's name.
            GateUp => (Some("mlp.gate_up_proj"), None, "ffn_up"),
            Down => (Some("mlp.down_proj"), Some("mlp.c_proj"), "ffn_down"),
        },
    }
}

/// llama.cpp's name for the module at `place` (`blk.0.attn_q`).
pub fn gguf_module(place: Place) -> String {
    let (_, _, name) = names(place);
    match place {
        Place::Layer(i, _) => format!("blk.{i}.{name}"),
        _ => name.into(),
    }
}

/// A checkpoint's module names: Hugging Face's Llama family, or GPT-2's.
pub struct Naming {
    gpt2: bool,
}

impl Naming {
    pub fn of(spec: &ModelSpec) -> Self {
        Naming {
            gpt2: spec.architecture == Architecture::Gpt2,
        }
    }

    /// Whether its linears are stored transposed (GPT-2's Conv1D).
    pub fn conv1d(&self) -> bool {
        self.gpt2
    }

    /// The module path of the module at `place` (`model.layers.0.self_attn.q_proj`).
    pub fn module(&self, place: Place) -> String {
        let (llama, gpt2, _) = names(place);
        let (name, blocks) = if self.gpt2 {
            (gpt2, "transformer.h")
        } else {
            (llama, "model.layers")
        };
        let Some(name) = name else {
            unreachable!("this checkpoint convention has no module at {place:?}")
        };
        match place {
            Place::Layer(i, _) => format!("{blocks}.{i}.{name}"),
            _ => name.into(),
        }
    }
}

/// Every module the spec implies, in the order of the forward pass: the one list that builds,
/// loads, checks, initialises and saves a model, and names its tensors in GGUF files.
pub fn modules(spec: &ModelSpec) -> Vec<ModuleSpec> {
    let n = Naming::of(spec);
    let h = spec.hidden_size;
    let mut out = vec![];
    let mut add = |place: Place, kind: ModuleKind| {
        out.push(ModuleSpec {
            name: n.module(place),
            place,
            kind,
        })
    };
    let linear = |out: usize, inp: usize, bias: bool| ModuleKind::Linear {
        out,
        inp,
        bias,
        conv1d: n.conv1d(),
    };
    let embedding = |rows: usize| ModuleKind::Embedding { rows, dim: h };
    add(Place::Embed, embedding(spec.vocab_size));
    if spec.positions == Positions::Learned {
        add(Place::PosEmbed, embedding(spec.max_position_embeddings));
    }
    for (i, l) in spec.layers.iter().enumerate() {
        let at = |part: Part| Place::Layer(i, part);
        let norm = ModuleKind::Norm {
            dim: h,
            spec: l.norm,
        };
        let (a, m) = (&l.attention, &l.mlp);
        let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        add(at(Part::AttnNorm), norm);
        if a.fused_qkv {
            add(at(Part::Qkv), linear(q + 2 * kv, h, a.qkv_bias));
        } else {
            add(at(Part::Q), linear(q, h, a.qkv_bias));
            add(at(Part::K), linear(kv, h, a.qkv_bias));
            add(at(Part::V), linear(kv, h, a.qkv_bias));
        }
        add(at(Part::O), linear(h, q, a.o_bias));
        add(at(Part::MlpNorm), norm);
        if m.fused_gate_up {
            add(at(Part::GateUp), linear(2 * m.intermediate_size, h, m.bias));
        } else {
            if m.kind == MlpKind::Gated {
                add(at(Part::Gate), linear(m.intermediate_size, h, m.bias));
            }
            add(at(Part::Up), linear(m.intermediate_size, h, m.bias));
        }
        add(at(Part::Down), linear(h, m.intermediate_size, m.bias));
    }
    add(
        Place::FinalNorm,
        ModuleKind::Norm {
            dim: h,
            spec: spec.final_norm,
        },
    );
    if !spec.tie_word_embeddings {
        // The LM head is a plain linear even in GPT-2 checkpoints.
        add(
            Place::LmHead,
            ModuleKind::Linear {
                out: spec.vocab_size,
                inp: h,
                bias: false,
                conv1d: false,
            },
        );
    }
    out
}

/// Every parameter the spec implies, in a stable order.
pub fn param_specs(spec: &ModelSpec) -> Vec<ParamSpec> {
    modules(spec).iter().flat_map(ModuleSpec::params).collect()
}

/// Tensors a checkpoint may hold that are not parameters (buffers older exports kept, or a
/// copy of a tied head).
pub fn is_ignorable(name: &str, spec: &ModelSpec) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
        || (spec.tie_word_embeddings && name == "lm_head.weight")
}

/// `*` matches any run of characters (module names contain dots, so `layers.*.mlp` spans one
/// index and `*` alone spans everything).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "lm_head"));
        assert!(glob_match(
            "model.layers.*.mlp.*",
            "model.layers.1.mlp.up_proj"
        ));
        assert!(!glob_match(
            "model.layers.*.mlp.*",
            "model.layers.1.self_attn.q_proj"
        ));
        assert!(glob_match("*q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!glob_match("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(glob_match("layers.*.mlp_out", "layers.11.mlp_out"));
    }
}

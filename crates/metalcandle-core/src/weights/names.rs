//! Tensor names and shapes per architecture: the single description of which parameters a
//! spec implies, used to load, check, initialise and save.

use crate::spec::{Architecture, MlpKind, ModelSpec, NormKind, Positions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Q,
    K,
    V,
    Qkv,
    O,
    Gate,
    Up,
    Down,
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

#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    /// Shape in the model's layout ([out, in] for linears).
    pub shape: Vec<usize>,
    /// Stored transposed ([in, out]) in the checkpoint (GPT-2's Conv1D).
    pub conv1d: bool,
    pub role: Role,
}

pub struct Naming {
    gpt2: bool,
}

impl Naming {
    pub fn of(spec: &ModelSpec) -> Self {
        Naming {
            gpt2: spec.architecture == Architecture::Gpt2,
        }
    }
    pub fn conv1d(&self) -> bool {
        self.gpt2
    }
    pub fn embed(&self) -> String {
        if self.gpt2 {
            "transformer.wte"
        } else {
            "model.embed_tokens"
        }
        .into()
    }
    pub fn pos_embed(&self) -> String {
        if self.gpt2 {
            "transformer.wpe"
        } else {
            "model.embed_positions"
        }
        .into()
    }
    pub fn final_norm(&self) -> String {
        if self.gpt2 {
            "transformer.ln_f"
        } else {
            "model.norm"
        }
        .into()
    }
    pub fn attn_norm(&self, i: usize) -> String {
        if self.gpt2 {
            format!("transformer.h.{i}.ln_1")
        } else {
            format!("model.layers.{i}.input_layernorm")
        }
    }
    pub fn mlp_norm(&self, i: usize) -> String {
        if self.gpt2 {
            format!("transformer.h.{i}.ln_2")
        } else {
            format!("model.layers.{i}.post_attention_layernorm")
        }
    }
    pub fn linear(&self, i: usize, kind: ParamKind) -> String {
        use ParamKind::*;
        if self.gpt2 {
            let m = match kind {
                Qkv => "attn.c_attn",
                O => "attn.c_proj",
                Up => "mlp.c_fc",
                Down => "mlp.c_proj",
                Q | K | V | Gate => unreachable!("GPT-2 has no separate {kind:?} projection"),
            };
            return format!("transformer.h.{i}.{m}");
        }
        let m = match kind {
            Q => "self_attn.q_proj",
            K => "self_attn.k_proj",
            V => "self_attn.v_proj",
            O => "self_attn.o_proj",
            Gate => "mlp.gate_proj",
            Up => "mlp.up_proj",
            Down => "mlp.down_proj",
            Qkv => unreachable!("only GPT-2 fuses q|k|v"),
        };
        format!("model.layers.{i}.{m}")
    }
}

/// Every parameter the spec implies, in a stable order.
pub fn param_specs(spec: &ModelSpec) -> Vec<ParamSpec> {
    let n = Naming::of(spec);
    let h = spec.hidden_size;
    let mut out = vec![];
    let mut push = |name: String, shape: Vec<usize>, conv1d: bool, role: Role| {
        out.push(ParamSpec {
            name,
            shape,
            conv1d,
            role,
        })
    };
    push(
        format!("{}.weight", n.embed()),
        vec![spec.vocab_size, h],
        false,
        Role::Embedding,
    );
    if spec.positions == Positions::Learned {
        push(
            format!("{}.weight", n.pos_embed()),
            vec![spec.max_position_embeddings, h],
            false,
            Role::Embedding,
        );
    }
    let linear = |push: &mut dyn FnMut(String, Vec<usize>, bool, Role),
                  module: String,
                  out_f: usize,
                  in_f: usize,
                  bias: bool| {
        push(
            format!("{module}.weight"),
            vec![out_f, in_f],
            n.conv1d(),
            Role::Weight,
        );
        if bias {
            push(format!("{module}.bias"), vec![out_f], false, Role::Bias);
        }
    };
    let norm =
        |push: &mut dyn FnMut(String, Vec<usize>, bool, Role), module: String, kind: NormKind| {
            push(format!("{module}.weight"), vec![h], false, Role::NormWeight);
            if kind == NormKind::LayerNorm {
                push(format!("{module}.bias"), vec![h], false, Role::NormBias);
            }
        };
    for (i, l) in spec.layers.iter().enumerate() {
        let a = &l.attention;
        let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
        norm(&mut push, n.attn_norm(i), l.norm.kind);
        if a.fused_qkv {
            linear(
                &mut push,
                n.linear(i, ParamKind::Qkv),
                q + 2 * kv,
                h,
                a.qkv_bias,
            );
        } else {
            linear(&mut push, n.linear(i, ParamKind::Q), q, h, a.qkv_bias);
            linear(&mut push, n.linear(i, ParamKind::K), kv, h, a.qkv_bias);
            linear(&mut push, n.linear(i, ParamKind::V), kv, h, a.qkv_bias);
        }
        linear(&mut push, n.linear(i, ParamKind::O), h, q, a.o_bias);
        norm(&mut push, n.mlp_norm(i), l.norm.kind);
        let m = &l.mlp;
        if m.kind == MlpKind::Gated {
            linear(
                &mut push,
                n.linear(i, ParamKind::Gate),
                m.intermediate_size,
                h,
                m.bias,
            );
        }
        linear(
            &mut push,
            n.linear(i, ParamKind::Up),
            m.intermediate_size,
            h,
            m.bias,
        );
        linear(
            &mut push,
            n.linear(i, ParamKind::Down),
            h,
            m.intermediate_size,
            m.bias,
        );
    }
    norm(&mut push, n.final_norm(), spec.final_norm.kind);
    if !spec.tie_word_embeddings {
        push(
            "lm_head.weight".into(),
            vec![spec.vocab_size, h],
            false,
            Role::Weight,
        );
    }
    out
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

//! The walk over a built decoder: every module with its place, by shared reference or mutably,
//! in the order of `weights::names::modules`. Parameters, linears and quantizable matrices are
//! filters over it. The shared and the mutable walks are one macro body, so they cannot drift.

use super::Decoder;
use crate::nn::attention::QkvProj;
use crate::nn::{Embedding, Linear, Norm, Weight};
use crate::weights::names::{param_name, Part, Place};
use candle_core::Tensor;

/// A module of the decoder: `ModuleRef` and `ModuleMut` borrow one from a model, and loading
/// builds owned ones.
#[derive(Debug)]
pub enum Module<E, N, L> {
    Embedding(E),
    Norm(N),
    Linear(L),
}

pub type ModuleRef<'a> = Module<&'a Embedding, &'a Norm, &'a Linear>;
pub type ModuleMut<'a> = Module<&'a mut Embedding, &'a mut Norm, &'a mut Linear>;

/// One parameter tensor: a matrix (token embedding, linear weight), which may be quantized, or a
/// float tensor (norm scales, biases).
#[derive(Debug)]
pub enum Param<W, T> {
    Matrix(W),
    Tensor(T),
}

pub type ParamRef<'a> = Param<&'a Weight, &'a Tensor>;
pub type ParamMut<'a> = Param<&'a mut Weight, &'a mut Tensor>;

/// Quantization applies to the token embedding, every linear layer and the LM head; learned
/// position tables stay float.
fn quantizable(place: Place) -> bool {
    place != Place::PosEmbed
}

/// Expands to the shared (no `mut`) or mutable (`mut`) versions of the walk and of what only
/// differs from it by the kind of borrow.
macro_rules! walks {
    (
        $modules:ident, $params:ident, $linears:ident, $matrices:ident,
        $Module:ident, $Param:ident $(, $mut:tt)?
    ) => {
        impl<'a> $Module<'a> {
            /// Calls `f` with each parameter of the module by checkpoint name: the weight, then
            /// the bias if any. (A callback, not a list: `visit_mut` runs on every decode step.)
            pub fn each_param(self, mut f: impl FnMut(String, $Param<'a>)) {
                let (name, weight, bias): (_, _, Option<&'a $($mut)? Tensor>) = match self {
                    Module::Embedding(e) => (&e.name, Param::Matrix(&$($mut)? e.weight), None),
                    Module::Norm(n) => (
                        &n.name,
                        Param::Tensor(&$($mut)? n.weight),
                        Option::from(&$($mut)? n.bias),
                    ),
                    Module::Linear(l) => (
                        &l.name,
                        Param::Matrix(&$($mut)? l.weight),
                        Option::from(&$($mut)? l.bias),
                    ),
                };
                f(param_name(name, "weight"), weight);
                if let Some(b) = bias {
                    f(param_name(name, "bias"), Param::Tensor(b));
                }
            }

            /// The module's name and matrix; None for a norm.
            pub fn matrix(self) -> Option<(&'a str, &'a $($mut)? Weight)> {
                match self {
                    Module::Embedding(e) => Some((&e.name, &$($mut)? e.weight)),
                    Module::Linear(l) => Some((&l.name, &$($mut)? l.weight)),
                    Module::Norm(_) => None,
                }
            }

            pub fn linear(self) -> Option<&'a $($mut)? Linear> {
                match self {
                    Module::Linear(l) => Some(l),
                    _ => None,
                }
            }
        }

        impl<'a> $Param<'a> {
            /// The float tensor; None for a quantized matrix.
            pub fn float(self) -> Option<&'a $($mut)? Tensor> {
                match self {
                    Param::Matrix(Weight::Float(t)) | Param::Tensor(t) => Some(t),
                    Param::Matrix(Weight::Quantized(_)) => None,
                }
            }
        }

        impl Decoder {
            /// Every module with its place, in the order of the forward pass.
            pub fn $modules(& $($mut)? self) -> Vec<(Place, $Module<'_>)> {
                let mut out = Vec::with_capacity(4 + 10 * self.blocks.len());
                out.push((Place::Embed, Module::Embedding(& $($mut)? self.embed)));
                if let Some(p) = & $($mut)? self.pos_embed {
                    out.push((Place::PosEmbed, Module::Embedding(p)));
                }
                for (i, b) in (& $($mut)? self.blocks).into_iter().enumerate() {
                    let at = |part| Place::Layer(i, part);
                    out.push((at(Part::AttnNorm), Module::Norm(& $($mut)? b.attn_norm)));
                    match & $($mut)? b.attn.qkv {
                        QkvProj::Separate { q, k, v } => out.extend([
                            (at(Part::Q), Module::Linear(q)),
                            (at(Part::K), Module::Linear(k)),
                            (at(Part::V), Module::Linear(v)),
                        ]),
                        QkvProj::Fused(qkv) => out.push((at(Part::Qkv), Module::Linear(qkv))),
                    }
                    out.push((at(Part::O), Module::Linear(& $($mut)? b.attn.o)));
                    out.push((at(Part::MlpNorm), Module::Norm(& $($mut)? b.mlp_norm)));
                    if let Some(g) = & $($mut)? b.mlp.gate {
                        out.push((at(Part::Gate), Module::Linear(g)));
                    }
                    let up = if b.mlp.spec.fused_gate_up { Part::GateUp } else { Part::Up };
                    out.push((at(up), Module::Linear(& $($mut)? b.mlp.up)));
                    out.push((at(Part::Down), Module::Linear(& $($mut)? b.mlp.down)));
                }
                out.push((Place::FinalNorm, Module::Norm(& $($mut)? self.final_norm)));
                if let Some(h) = & $($mut)? self.lm_head {
                    out.push((Place::LmHead, Module::Linear(h)));
                }
                out
            }

            /// Every parameter tensor, float or quantized, with its module's place and its
            /// checkpoint name.
            pub fn $params(& $($mut)? self) -> Vec<(Place, String, $Param<'_>)> {
                let mut out = vec![];
                for (place, m) in self.$modules() {
                    m.each_param(|name, p| out.push((place, name, p)));
                }
                out
            }

            /// The linear layers of the blocks (the LM head is not one): what adapters,
            /// calibration observers and the training flag apply to.
            pub fn $linears(& $($mut)? self) -> Vec<& $($mut)? Linear> {
                self.$modules()
                    .into_iter()
                    .filter(|(place, _)| place.layer().is_some())
                    .filter_map(|(_, m)| m.linear())
                    .collect()
            }

            /// The matrices quantization applies to, by module name: the token embedding, every
            /// linear layer and the LM head (absent when tied to the embedding).
            pub fn $matrices(& $($mut)? self) -> Vec<(String, & $($mut)? Weight)> {
                self.$modules()
                    .into_iter()
                    .filter(|(place, _)| quantizable(*place))
                    .filter_map(|(_, m)| m.matrix())
                    .map(|(name, w)| (name.to_string(), w))
                    .collect()
            }
        }
    };
}

walks!(modules, params, linears, matrices, ModuleRef, ParamRef);
walks!(
    modules_mut,
    params_mut,
    linears_mut,
    quantizable_mut,
    ModuleMut,
    ParamMut,
    mut
);

impl Decoder {
    /// Every float parameter with its checkpoint name, in a stable order. Quantized weights are
    /// not parameters in this sense: nothing trains or replaces them.
    pub fn parameters(&self) -> Vec<(String, &Tensor)> {
        self.params()
            .into_iter()
            .filter_map(|(_, name, p)| Some((name, p.float()?)))
            .collect()
    }

    /// `parameters` as handles that outlive the borrow (they share storage with the model).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.parameters()
            .into_iter()
            .map(|(name, t)| (name, t.clone()))
            .collect()
    }

    /// Visits every float parameter tensor mutably (to make it trainable, or to replace it).
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for (_, m) in self.modules_mut() {
            m.each_param(|name, p| {
                if let Some(t) = p.float() {
                    f(&name, t);
                }
            });
        }
    }

    /// Every weight and bias, float or quantized.
    pub fn num_parameters(&self) -> usize {
        self.params()
            .iter()
            .map(|(_, _, p)| match p {
                Param::Matrix(w) => w.elem_count(),
                Param::Tensor(t) => t.elem_count(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;
    use crate::weights::names::param_specs;
    use candle_core::Device;
    use serde_json::json;

    fn gpt2(tied: bool) -> Decoder {
        let config = json!({
            "model_type": "gpt2", "vocab_size": 50, "n_embd": 32, "n_layer": 2, "n_head": 4,
            "n_positions": 16, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": tied
        });
        let spec = ModelSpec::from_hf_config(&config, "config").unwrap();
        Decoder::random(spec, config, 0, &Device::Cpu).unwrap()
    }

    fn names_and_shapes(m: &Decoder) -> Vec<(String, Vec<usize>)> {
        m.params()
            .into_iter()
            .map(|(_, n, p)| {
                let dims = match p {
                    Param::Matrix(w) => w.dims().to_vec(),
                    Param::Tensor(t) => t.dims().to_vec(),
                };
                (n, dims)
            })
            .collect()
    }

    #[test]
    fn the_walk_yields_the_checkpoint_names_in_the_spec_lists_order() {
        // The state-dict names of Hugging Face's GPT2LMHeadModel (Conv1D weights in the
        // model's [out, in] layout), and of LlamaForCausalLM.
        let gpt2_block: Vec<(&str, Vec<usize>)> = vec![
            ("ln_1.weight", vec![32]),
            ("ln_1.bias", vec![32]),
            ("attn.c_attn.weight", vec![96, 32]),
            ("attn.c_attn.bias", vec![96]),
            ("attn.c_proj.weight", vec![32, 32]),
            ("attn.c_proj.bias", vec![32]),
            ("ln_2.weight", vec![32]),
            ("ln_2.bias", vec![32]),
            ("mlp.c_fc.weight", vec![128, 32]),
            ("mlp.c_fc.bias", vec![128]),
            ("mlp.c_proj.weight", vec![32, 128]),
            ("mlp.c_proj.bias", vec![32]),
        ];
        let llama_block: Vec<(&str, Vec<usize>)> = vec![
            ("input_layernorm.weight", vec![32]),
            ("self_attn.q_proj.weight", vec![32, 32]),
            ("self_attn.k_proj.weight", vec![16, 32]),
            ("self_attn.v_proj.weight", vec![16, 32]),
            ("self_attn.o_proj.weight", vec![32, 32]),
            ("post_attention_layernorm.weight", vec![32]),
            ("mlp.gate_proj.weight", vec![48, 32]),
            ("mlp.up_proj.weight", vec![48, 32]),
            ("mlp.down_proj.weight", vec![32, 48]),
        ];
        // Phi3ForCausalLM: q|k|v (4 heads of 8 over 2 kv heads) and gate|up in one linear each.
        let phi3_block: Vec<(&str, Vec<usize>)> = vec![
            ("input_layernorm.weight", vec![32]),
            ("self_attn.qkv_proj.weight", vec![64, 32]),
            ("self_attn.o_proj.weight", vec![32, 32]),
            ("post_attention_layernorm.weight", vec![32]),
            ("mlp.gate_up_proj.weight", vec![96, 32]),
            ("mlp.down_proj.weight", vec![32, 48]),
        ];
        let expect = |top: &[(&str, Vec<usize>)],
                      prefix: &str,
                      block: &[(&str, Vec<usize>)],
                      end: &[(&str, Vec<usize>)]| {
            let mut out: Vec<(String, Vec<usize>)> = top
                .iter()
                .map(|(n, s)| (n.to_string(), s.clone()))
                .collect();
            for i in 0..2 {
                out.extend(
                    block
                        .iter()
                        .map(|(n, s)| (format!("{prefix}.{i}.{n}"), s.clone())),
                );
            }
            out.extend(end.iter().map(|(n, s)| (n.to_string(), s.clone())));
            out
        };
        let gpt2_top = [
            ("transformer.wte.weight", vec![50, 32]),
            ("transformer.wpe.weight", vec![16, 32]),
        ];
        let ln_f = [
            ("transformer.ln_f.weight", vec![32]),
            ("transformer.ln_f.bias", vec![32]),
        ];
        let head = ("lm_head.weight", vec![50, 32]);
        let untied_end = [ln_f[0].clone(), ln_f[1].clone(), head.clone()];
        let llama_end = [("model.norm.weight", vec![32]), head];
        let llama_top = [("model.embed_tokens.weight", vec![50, 32])];
        let cases = [
            (
                gpt2(true),
                expect(&gpt2_top, "transformer.h", &gpt2_block, &ln_f),
            ),
            (
                gpt2(false),
                expect(&gpt2_top, "transformer.h", &gpt2_block, &untied_end),
            ),
            (
                crate::testing::llama(50, 32, 48, false, 0),
                expect(&llama_top, "model.layers", &llama_block, &llama_end),
            ),
            (
                crate::testing::random_model(crate::testing::phi3_config(50, 32, 48), 0),
                expect(&llama_top, "model.layers", &phi3_block, &llama_end),
            ),
        ];
        for (m, want) in cases {
            assert_eq!(names_and_shapes(&m), want);
            let specs: Vec<(Place, String)> = param_specs(&m.spec)
                .into_iter()
                .map(|p| (p.place, p.name))
                .collect();
            let walked: Vec<(Place, String)> =
                m.params().into_iter().map(|(p, n, _)| (p, n)).collect();
            assert_eq!(walked, specs);
            let count: usize = want.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            assert_eq!(m.num_parameters(), count);
        }
    }

    #[test]
    fn the_mutable_walk_visits_what_the_shared_one_reads() {
        let mut m = gpt2(false);
        let shared: Vec<String> = m.parameters().into_iter().map(|(n, _)| n).collect();
        let mut visited = vec![];
        m.visit_mut(&mut |n, t| {
            visited.push(n.to_string());
            *t = t.zeros_like().unwrap();
        });
        assert_eq!(visited, shared);
        assert!(m.parameters().iter().all(|(_, t)| t
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            == 0.0));
        // The learned position table is no matrix quantization applies to; the head is.
        let matrices: Vec<String> = m.matrices().into_iter().map(|(n, _)| n).collect();
        let mutable: Vec<String> = m.quantizable_mut().into_iter().map(|(n, _)| n).collect();
        assert_eq!(matrices, mutable);
        assert_eq!(
            matrices.first().map(String::as_str),
            Some("transformer.wte")
        );
        assert_eq!(matrices.last().map(String::as_str), Some("lm_head"));
        assert!(!matrices.iter().any(|n| n == "transformer.wpe"));
        assert_eq!(matrices.len(), 2 + 2 * 4);
        let linears: Vec<&str> = m.linears().into_iter().map(|l| l.name.as_str()).collect();
        assert_eq!(linears.len(), 2 * 4);
        assert!(!linears.contains(&"lm_head"));
    }

    #[test]
    fn loading_names_the_missing_tensor() {
        let m = crate::testing::llama(50, 32, 48, true, 0);
        let mut tensors: std::collections::HashMap<String, Tensor> =
            m.named_parameters().into_iter().collect();
        tensors.remove("model.layers.1.mlp.up_proj.weight");
        let e = Decoder::from_tensors(m.spec.clone(), m.config.clone(), tensors, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
            "{e}"
        );
    }
}

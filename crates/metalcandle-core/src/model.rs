//! The decoder: embeddings -> blocks (pre-norm attention and MLP, residual) -> final norm -> LM head.
//! One implementation for every architecture; the spec says what differs.

use crate::error::{Error, Result};
use crate::nn::attention::{AttnMask, QkvProj};
use crate::nn::embedding::sinusoidal;
use crate::nn::mask::attention_mask;
use crate::nn::rope::RotaryTables;
use crate::nn::{Attention, Embedding, LayerCache, Linear, Mlp, Norm, Weight};
use crate::ops::dropout::{Dropout, Site};
use crate::spec::{MlpKind, ModelSpec, NormKind, Positions};
use crate::weights::names::{self, ParamKind};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub mlp_norm: Norm,
    pub mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Decoder {
    pub spec: ModelSpec,
    /// The `config.json` the model was built from, written back on save.
    pub config: serde_json::Value,
    pub embed: Embedding,
    /// Learned positions only.
    pub pos_embed: Option<Embedding>,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    /// None when tied to the token embedding.
    pub lm_head: Option<Linear>,
    rope: Option<Vec<RotaryTables>>,
    /// Set while LoRA adapters are attached.
    pub lora_config: Option<crate::lora::LoraConfig>,
    /// Intervention points (see `hooks`); empty by default.
    pub hooks: crate::hooks::Hooks,
    /// Quantization-aware training: the matrices a training step rounds (see quant/qat.rs).
    pub qat: Option<crate::quant::qat::Qat>,
    pub device: Device,
    pub dtype: DType,
    /// The fused training path's buffers, kept between steps.
    pub(crate) engine: crate::engine::Slot,
    /// The variables training updates, whose storage the model's tensors share (see
    /// `make_trainable`); empty until the first step.
    pub(crate) trainable: Vec<(String, candle_core::Var)>,
}

/// The keys and values of every layer, and how many tokens they hold.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.kv.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }

    /// Keeps the batch rows `rows` in that order (beam search).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for l in self.layers.iter_mut() {
            if let Some((k, v)) = &l.kv {
                let idx = Tensor::new(rows, k.device())?;
                l.kv = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone)]
pub struct ForwardOptions<'a> {
    /// [B, past + T] row-major, 1 = token, 0 = padding.
    pub attention_mask: Option<&'a [i64]>,
    /// [B, T] row-major; defaults to past..past+T for every row.
    pub position_ids: Option<&'a [i64]>,
    pub output_hidden_states: bool,
    /// This micro-batch's dropout masks (training only; `None` runs deterministically).
    pub dropout: Option<Dropout>,
}

pub struct ForwardOutput {
    /// Input of the LM head [B, T, hidden].
    pub last_hidden: Tensor,
    /// Embedding output, each block's output, and the final-normed last block output.
    pub hidden_states: Vec<Tensor>,
}

impl Decoder {
    /// Builds a model from tensors named as in the checkpoint (see `weights::names`), already
    /// in the model's layout ([out, in] linears).
    pub fn from_tensors(
        spec: ModelSpec,
        config: serde_json::Value,
        mut t: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let dtype = t.values().next().map(|x| x.dtype()).unwrap_or(DType::F32);
        let mut take = |name: &str| -> Result<Tensor> {
            t.remove(name)
                .ok_or_else(|| Error::Weights(format!("missing tensor `{name}`")))
        };
        let n = names::Naming::of(&spec);
        let linear = |take: &mut dyn FnMut(&str) -> Result<Tensor>,
                      module: String,
                      bias: bool|
         -> Result<Linear> {
            let weight = Weight::Float(take(&format!("{module}.weight"))?);
            let bias = if bias {
                Some(take(&format!("{module}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(module, weight, bias))
        };
        let norm = |take: &mut dyn FnMut(&str) -> Result<Tensor>,
                    module: String,
                    spec: crate::spec::NormSpec|
         -> Result<Norm> {
            Ok(Norm {
                weight: take(&format!("{module}.weight"))?,
                bias: if spec.kind == NormKind::LayerNorm {
                    Some(take(&format!("{module}.bias"))?)
                } else {
                    None
                },
                name: module,
                spec,
            })
        };
        let embed = Embedding {
            name: n.embed(),
            weight: Weight::Float(take(&format!("{}.weight", n.embed()))?),
        };
        let pos_embed = match spec.positions {
            Positions::Learned => Some(Embedding {
                name: n.pos_embed(),
                weight: Weight::Float(take(&format!("{}.weight", n.pos_embed()))?),
            }),
            _ => None,
        };
        let mut blocks = Vec::with_capacity(spec.layers.len());
        for (i, ls) in spec.layers.iter().enumerate() {
            let a = &ls.attention;
            let qkv = if a.fused_qkv {
                QkvProj::Fused(linear(&mut take, n.linear(i, ParamKind::Qkv), a.qkv_bias)?)
            } else {
                QkvProj::Separate {
                    q: linear(&mut take, n.linear(i, ParamKind::Q), a.qkv_bias)?,
                    k: linear(&mut take, n.linear(i, ParamKind::K), a.qkv_bias)?,
                    v: linear(&mut take, n.linear(i, ParamKind::V), a.qkv_bias)?,
                }
            };
            let o = linear(&mut take, n.linear(i, ParamKind::O), a.o_bias)?;
            let m = &ls.mlp;
            let gate = match m.kind {
                MlpKind::Gated => Some(linear(&mut take, n.linear(i, ParamKind::Gate), m.bias)?),
                MlpKind::Plain => None,
            };
            blocks.push(Block {
                attn_norm: norm(&mut take, n.attn_norm(i), ls.norm)?,
                attn: Attention { spec: *a, qkv, o },
                mlp_norm: norm(&mut take, n.mlp_norm(i), ls.norm)?,
                mlp: Mlp {
                    spec: *m,
                    gate,
                    up: linear(&mut take, n.linear(i, ParamKind::Up), m.bias)?,
                    down: linear(&mut take, n.linear(i, ParamKind::Down), m.bias)?,
                },
            });
        }
        let final_norm = norm(&mut take, n.final_norm(), spec.final_norm)?;
        let lm_head = if spec.tie_word_embeddings {
            None
        } else {
            Some(linear(&mut take, "lm_head".into(), false)?)
        };
        let rope = match &spec.positions {
            Positions::Rope { theta, scaling } => Some(
                spec.layers
                    .iter()
                    .map(|l| RotaryTables::new(l.attention.head_dim, *theta, scaling))
                    .collect(),
            ),
            _ => None,
        };
        Ok(Self {
            spec,
            config,
            embed,
            pos_embed,
            blocks,
            final_norm,
            lm_head,
            rope,
            lora_config: None,
            hooks: Default::default(),
            qat: None,
            device: device.clone(),
            dtype,
            engine: Default::default(),
            trainable: vec![],
        })
    }

    /// A randomly initialised model of the given spec (`config` is what `save` will write).
    pub fn random(
        spec: ModelSpec,
        config: serde_json::Value,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let tensors = crate::weights::init_tensors(&spec, seed, 0.02, device)?;
        Self::from_tensors(spec, config, tensors, device)
    }

    /// Every parameter with its checkpoint name, in a stable order.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        self.visit(&mut |name, t| out.push((name.to_string(), t.clone())));
        out
    }

    fn visit(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        let mut this = self.clone();
        this.visit_mut(&mut |name, t| f(name, t));
    }

    /// Visits every float parameter tensor mutably (to make it trainable, or to replace it).
    /// Quantized weights are not parameters in this sense: nothing trains or replaces them.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        visit_weight(&self.embed.name, &mut self.embed.weight, f);
        if let Some(p) = &mut self.pos_embed {
            visit_weight(&p.name, &mut p.weight, f);
        }
        let norm = |n: &mut Norm, f: &mut dyn FnMut(&str, &mut Tensor)| {
            f(&format!("{}.weight", n.name), &mut n.weight);
            if let Some(b) = &mut n.bias {
                f(&format!("{}.bias", n.name), b);
            }
        };
        for b in self.blocks.iter_mut() {
            norm(&mut b.attn_norm, f);
            for l in b.attn.linears_mut() {
                visit_linear(l, f);
            }
            norm(&mut b.mlp_norm, f);
            for l in b.mlp.linears_mut() {
                visit_linear(l, f);
            }
        }
        norm(&mut self.final_norm, f);
        if let Some(l) = &mut self.lm_head {
            visit_linear(l, f);
        }
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out: Vec<&mut Linear> = vec![];
        for b in self.blocks.iter_mut() {
            out.extend(b.attn.linears_mut());
            out.extend(b.mlp.linears_mut());
        }
        out
    }

    /// Every weight and bias, float or quantized.
    pub fn num_parameters(&self) -> usize {
        let float: usize = self
            .named_parameters()
            .iter()
            .map(|(_, t)| t.elem_count())
            .sum();
        let quantized: usize = self
            .quantized_weights()
            .iter()
            .map(|(_, w)| w.elem_count())
            .sum();
        float + quantized
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); self.blocks.len()],
        }
    }

    pub(crate) fn check_inputs(
        &self,
        ids: &Tensor,
        past: usize,
        opts: &ForwardOptions,
    ) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::Input(format!(
                "input_ids must be 2-D [batch, seq], got shape {:?}",
                ids.dims()
            ))
        })?;
        if b == 0 || t == 0 {
            return Err(Error::Input(format!(
                "input_ids is empty (shape [{b}, {t}])"
            )));
        }
        if let Some(m) = opts.attention_mask {
            if m.len() != b * (past + t) {
                return Err(Error::Input(format!(
                    "attention_mask has {} entries, expected batch x (cached + new tokens) = {b} x {}",
                    m.len(),
                    past + t
                )));
            }
        }
        if let Some(p) = opts.position_ids {
            if p.len() != b * t {
                return Err(Error::Input(format!(
                    "position_ids has {} entries, expected {b} x {t}",
                    p.len()
                )));
            }
            if let Some(bad) = p.iter().find(|&&x| x < 0) {
                return Err(Error::Input(format!(
                    "position_ids must be >= 0, got {bad}"
                )));
            }
        }
        if self.pos_embed.is_some() {
            let max_pos = opts
                .position_ids
                .map(|p| *p.iter().max().unwrap() as usize)
                .unwrap_or(past + t - 1);
            if max_pos >= self.spec.max_position_embeddings {
                return Err(Error::Input(format!(
                    "position {max_pos} is beyond the model's {} learned positions",
                    self.spec.max_position_embeddings
                )));
            }
        }
        Ok((b, t))
    }

    /// Runs the decoder up to the LM head's input. `ids` is u32 [B, T].
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        mut cache: Option<&mut KvCache>,
    ) -> Result<ForwardOutput> {
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let (b, t) = self.check_inputs(ids, past, opts)?;
        let positions: Vec<i64> = match opts.position_ids {
            Some(p) => p.to_vec(),
            None => (0..b)
                .flat_map(|_| (past..past + t).map(|p| p as i64))
                .collect(),
        };
        let hooked = self.hooks.active();
        let at = |name: &dyn Fn() -> String, x: Tensor| -> Result<Tensor> {
            if hooked {
                self.hooks.apply(&name(), x)
            } else {
                Ok(x)
            }
        };
        let mut x = self.embed.forward(ids)?;
        match (&self.spec.positions, &self.pos_embed) {
            (Positions::Learned, Some(pe)) => {
                let pos = Tensor::from_vec(
                    positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                    (b, t),
                    &self.device,
                )?;
                x = (x + pe.forward(&pos)?)?;
            }
            (Positions::Sinusoidal, _) => {
                x = (x + sinusoidal(
                    &positions,
                    (b, t),
                    self.spec.hidden_size,
                    self.dtype,
                    &self.device,
                )?)?;
            }
            _ => {}
        }
        let drop = |site: Site, x: Tensor| -> Result<Tensor> {
            match opts.dropout {
                Some(d) => Ok(d.at(site).forward(&x)?),
                None => Ok(x),
            }
        };
        x = at(&|| "embed".into(), drop(Site::Embed, x)?)?;
        let mut hidden = vec![];
        if opts.output_hidden_states {
            hidden.push(x.clone());
        }
        let mut masks: HashMap<Option<usize>, Tensor> = HashMap::new();
        let mut tables: HashMap<usize, (Tensor, Tensor)> = HashMap::new();
        for (i, block) in self.blocks.iter().enumerate() {
            let window = block.attn.spec.sliding_window;
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry(window) {
                e.insert(attention_mask(
                    b,
                    t,
                    past,
                    window,
                    opts.attention_mask,
                    self.dtype,
                    &self.device,
                )?);
            }
            let rope = match &self.rope {
                Some(r) => {
                    let hd = block.attn.spec.head_dim;
                    if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(hd) {
                        e.insert(r[i].cos_sin(&positions, (b, t), self.dtype, &self.device)?);
                    }
                    tables.get(&hd)
                }
                None => None,
            };
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let attn_in = at(
                &|| format!("layers.{i}.attn_in"),
                block.attn_norm.forward(&x)?,
            )?;
            let inner = |name: &str, t: Tensor| -> candle_core::Result<Tensor> {
                self.hooks
                    .apply(&format!("layers.{i}.{name}"), t)
                    .map_err(candle_core::Error::from)
            };
            let h = block.attn.forward(
                &attn_in,
                rope,
                AttnMask::Dense(&masks[&window]),
                layer_cache,
                if hooked { Some(&inner) } else { None },
                opts.dropout.map(|d| d.at(Site::AttnProbs(i))),
            )?;
            let h = drop(Site::AttnOut(i), h)?;
            x = (x + at(&|| format!("layers.{i}.attn_out"), h)?)?;
            let h = block.mlp.forward(&block.mlp_norm.forward(&x)?)?;
            let h = drop(Site::MlpOut(i), h)?;
            x = (x + at(&|| format!("layers.{i}.mlp_out"), h)?)?;
            x = at(&|| format!("layers.{i}.residual"), x)?;
            if opts.output_hidden_states && i + 1 < self.blocks.len() {
                hidden.push(x.clone());
            }
        }
        let last_hidden = at(&|| "final_norm".into(), self.final_norm.forward(&x)?)?;
        if opts.output_hidden_states {
            hidden.push(last_hidden.clone());
        }
        Ok(ForwardOutput {
            last_hidden,
            hidden_states: hidden,
        })
    }

    /// The rotary tables of each layer (RoPE models).
    pub(crate) fn rope_tables(&self) -> Option<&[RotaryTables]> {
        self.rope.as_deref()
    }

    /// The LM head: [.., hidden] -> [.., vocab].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden)?,
            None => self.embed.weight.linear(hidden)?,
        };
        if self.hooks.active() {
            return self.hooks.apply("logits", logits);
        }
        Ok(logits)
    }

    pub fn forward(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        cache: Option<&mut KvCache>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let out = self.forward_hidden(ids, opts, cache)?;
        Ok((self.logits(&out.last_hidden)?, out.hidden_states))
    }

    /// Logits of the last position only [B, vocab]: what a decode step needs.
    pub fn forward_last(
        &self,
        ids: &Tensor,
        opts: &ForwardOptions,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let out = self.forward_hidden(ids, opts, cache)?;
        let t = out.last_hidden.dim(1)?;
        Ok(self
            .logits(&out.last_hidden.narrow(1, t - 1, 1)?)?
            .squeeze(1)?)
    }
}

fn visit_weight(module: &str, w: &mut Weight, f: &mut dyn FnMut(&str, &mut Tensor)) {
    if let Some(t) = w.float_mut() {
        f(&format!("{module}.weight"), t);
    }
}

fn visit_linear(l: &mut Linear, f: &mut dyn FnMut(&str, &mut Tensor)) {
    visit_weight(&l.name, &mut l.weight, f);
    if let Some(b) = &mut l.bias {
        f(&format!("{}.bias", l.name), b);
    }
}

impl Decoder {
    /// Visits the LoRA matrices, named `{module}.lora_A.weight` / `{module}.lora_B.weight`.
    pub fn visit_adapter_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for l in self.linears_mut() {
            let name = l.name.clone();
            if let Some(lora) = &mut l.lora {
                f(&format!("{name}.lora_A.weight"), &mut lora.a);
                f(&format!("{name}.lora_B.weight"), &mut lora.b);
            }
        }
    }

    /// LoRA dropout (and any other train-only behaviour) on or off.
    pub fn set_training(&mut self, training: bool) {
        for l in self.linears_mut() {
            l.training = training;
        }
    }
}

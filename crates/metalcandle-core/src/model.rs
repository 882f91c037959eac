//! The decoder: embeddings -> blocks (pre-norm attention and MLP, residual) -> final norm -> LM head.
//! One implementation for every architecture; the spec says what differs.

mod build;
mod walk;

pub use walk::{Module, ModuleMut, ModuleRef, Param, ParamMut, ParamRef};

use crate::error::{Error, Result};
use crate::nn::attention::AttnMask;
use crate::nn::embedding::sinusoidal;
use crate::nn::mask::attention_mask;
use crate::nn::rope::RotaryTables;
use crate::nn::{Attention, Embedding, LayerCache, Linear, Mlp, Norm};
use crate::ops::dropout::{Dropout, Site};
use crate::spec::{ModelSpec, Positions};
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

/// `{module}.lora_A.weight` / `{module}.lora_B.weight`: the adapter's matrices in PEFT's naming,
/// less its `base_model.model.` prefix.
pub fn adapter_name(module: &str, which: &str) -> String {
    format!("{module}.{which}.weight")
}

impl Decoder {
    /// Visits the LoRA matrices, named as [`adapter_name`] says.
    pub fn visit_adapter_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        for l in self.linears_mut() {
            let name = l.name.clone();
            if let Some(lora) = &mut l.lora {
                f(&adapter_name(&name, "lora_A"), &mut lora.a);
                f(&adapter_name(&name, "lora_B"), &mut lora.b);
            }
        }
    }

    /// The LoRA matrices by name, in the order of `visit_adapter_mut`.
    pub fn adapter_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for l in self.linears() {
            if let Some(lora) = &l.lora {
                out.push((adapter_name(&l.name, "lora_A"), lora.a.clone()));
                out.push((adapter_name(&l.name, "lora_B"), lora.b.clone()));
            }
        }
        out
    }

    /// LoRA dropout (and any other train-only behaviour) on or off.
    pub fn set_training(&mut self, training: bool) {
        for l in self.linears_mut() {
            l.training = training;
        }
    }
}

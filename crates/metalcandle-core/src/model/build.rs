//! Building a decoder from named tensors: each module the spec implies (`weights::names::modules`)
//! takes its own tensors, and goes where its place says.

use super::walk::Module;
use super::{Block, Decoder};
use crate::error::{Error, Result};
use crate::nn::attention::QkvProj;
use crate::nn::rope::RotaryTables;
use crate::nn::{Attention, Embedding, Linear, Mlp, Norm, Weight};
use crate::spec::{ModelSpec, Positions};
use crate::weights::names::{self, ModuleKind, ModuleSpec, Part, Place};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// The modules not yet placed, and the tensors not yet taken.
struct Parts {
    modules: HashMap<Place, ModuleSpec>,
    tensors: HashMap<String, Tensor>,
}

impl Parts {
    /// The module at `place` with its tensors; None when the spec implies none there.
    fn take(&mut self, place: Place) -> Result<Option<Module<Embedding, Norm, Linear>>> {
        let Some(m) = self.modules.remove(&place) else {
            return Ok(None);
        };
        let (mut weight, mut bias) = (None, None);
        for p in m.params() {
            let t = self
                .tensors
                .remove(&p.name)
                .ok_or_else(|| Error::Weights(format!("missing tensor `{}`", p.name)))?;
            *if p.role.is_bias() {
                &mut bias
            } else {
                &mut weight
            } = Some(t);
        }
        let weight = weight.ok_or_else(|| misplaced(place))?;
        Ok(Some(match m.kind {
            ModuleKind::Embedding { .. } => Module::Embedding(Embedding {
                name: m.name,
                weight: Weight::Float(weight),
            }),
            ModuleKind::Norm { spec, .. } => Module::Norm(Norm {
                name: m.name,
                spec,
                weight,
                bias,
            }),
            ModuleKind::Linear { .. } => {
                Module::Linear(Linear::new(m.name, Weight::Float(weight), bias))
            }
        }))
    }

    fn embedding(&mut self, place: Place) -> Result<Option<Embedding>> {
        match self.take(place)? {
            None => Ok(None),
            Some(Module::Embedding(e)) => Ok(Some(e)),
            Some(_) => Err(misplaced(place)),
        }
    }

    fn maybe_linear(&mut self, place: Place) -> Result<Option<Linear>> {
        match self.take(place)? {
            None => Ok(None),
            Some(Module::Linear(l)) => Ok(Some(l)),
            Some(_) => Err(misplaced(place)),
        }
    }

    fn linear(&mut self, place: Place) -> Result<Linear> {
        required(place, self.maybe_linear(place)?)
    }

    fn norm(&mut self, place: Place) -> Result<Norm> {
        match self.take(place)? {
            Some(Module::Norm(n)) => Ok(n),
            _ => Err(misplaced(place)),
        }
    }
}

/// `weights::names::modules` and the decoder's layout disagree: a bug, reported, not a panic.
fn misplaced(place: Place) -> Error {
    Error::Msg(format!(
        "internal error: the spec's module list has no fitting module at {place:?}"
    ))
}

fn required<T>(place: Place, m: Option<T>) -> Result<T> {
    m.ok_or_else(|| misplaced(place))
}

impl Decoder {
    /// Builds a model from tensors named as in the checkpoint (see `weights::names`), already
    /// in the model's layout ([out, in] linears).
    pub fn from_tensors(
        spec: ModelSpec,
        config: serde_json::Value,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let dtype = tensors
            .values()
            .next()
            .map(|x| x.dtype())
            .unwrap_or(DType::F32);
        let mut parts = Parts {
            modules: names::modules(&spec)
                .into_iter()
                .map(|m| (m.place, m))
                .collect(),
            tensors,
        };
        let embed = required(Place::Embed, parts.embedding(Place::Embed)?)?;
        let pos_embed = parts.embedding(Place::PosEmbed)?;
        let mut blocks = Vec::with_capacity(spec.layers.len());
        for (i, ls) in spec.layers.iter().enumerate() {
            let at = |part| Place::Layer(i, part);
            let qkv = match parts.maybe_linear(at(Part::Qkv))? {
                Some(qkv) => QkvProj::Fused(qkv),
                None => QkvProj::Separate {
                    q: parts.linear(at(Part::Q))?,
                    k: parts.linear(at(Part::K))?,
                    v: parts.linear(at(Part::V))?,
                },
            };
            blocks.push(Block {
                attn_norm: parts.norm(at(Part::AttnNorm))?,
                attn: Attention {
                    spec: ls.attention,
                    qkv,
                    o: parts.linear(at(Part::O))?,
                },
                mlp_norm: parts.norm(at(Part::MlpNorm))?,
                mlp: Mlp {
                    spec: ls.mlp,
                    gate: parts.maybe_linear(at(Part::Gate))?,
                    up: parts.linear(at(if ls.mlp.fused_gate_up {
                        Part::GateUp
                    } else {
                        Part::Up
                    }))?,
                    down: parts.linear(at(Part::Down))?,
                },
            });
        }
        let final_norm = parts.norm(Place::FinalNorm)?;
        let lm_head = parts.maybe_linear(Place::LmHead)?;
        // A module the list gained but the decoder has no field for.
        if let Some(place) = parts.modules.keys().next() {
            return Err(misplaced(*place));
        }
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
}

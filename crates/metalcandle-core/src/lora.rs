//! LoRA adapters with PEFT's semantics and file format: `y = W x + b + s * B (A dropout(x))`,
//! A [r, in] kaiming-uniform(a=sqrt(5)), B [out, r] zeros, s = alpha/r (alpha/sqrt(r) with
//! rsLoRA). Saved as `adapter_config.json` + `adapter_model.safetensors` with PEFT's names.

use crate::error::{Error, Result};
use crate::model::Decoder;
use crate::nn::{Linear, Weight};
use crate::rng::Rng;
use crate::spec::Architecture;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module names (`q_proj`, `c_attn`, ...), or `["all-linear"]`.
    pub target_modules: Vec<String>,
    pub layers_to_transform: Option<Vec<usize>>,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("lora", "r", "must be > 0"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(
                "lora",
                "dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(Error::config(
                "lora",
                "target_modules",
                "must name at least one module, or be \"all-linear\"",
            ));
        }
        Ok(())
    }

    /// Whether the linear called `name` (a full module path) gets an adapter.
    fn targets(&self, name: &str) -> bool {
        let short = name.rsplit('.').next().unwrap_or(name);
        let all = self.target_modules.iter().any(|t| t == "all-linear");
        if !(all
            || self
                .target_modules
                .iter()
                .any(|t| t == short || name.ends_with(&format!(".{t}"))))
        {
            return false;
        }
        match &self.layers_to_transform {
            None => true,
            Some(layers) => layer_index(name).is_some_and(|i| layers.contains(&i)),
        }
    }
}

/// The block index in `model.layers.N.…` or `transformer.h.N.…`.
fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == "layers" || w[0] == "h")
        .and_then(|w| w[1].parse().ok())
}

#[derive(Debug, Clone)]
pub struct Lora {
    /// [r, in]
    pub a: Tensor,
    /// [out, r]
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    /// Folded into the base weight: the branch is skipped.
    pub merged: bool,
}

impl Lora {
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        self.b.matmul(&self.a)? * self.scaling
    }

    /// `s * B (A x)`; dropout on x only while training.
    pub fn forward(&self, x: &Tensor, training: bool) -> candle_core::Result<Tensor> {
        let x = if training && self.dropout > 0.0 {
            candle_nn::ops::dropout(x, self.dropout as f32)?
        } else {
            x.clone()
        };
        let h = x.broadcast_matmul(&self.a.t()?)?;
        h.broadcast_matmul(&self.b.t()?)? * self.scaling
    }
}

/// The float weight an adapter merges into; a quantized base cannot take a merge without
/// requantizing, which would lose the adapter's small update in the rounding.
fn float_base<'a>(module: &str, w: &'a mut Weight) -> Result<&'a mut Tensor> {
    w.float_mut().ok_or_else(|| {
        Error::Input(format!(
            "{module}: cannot merge an adapter into a quantized weight; dequantize the model first"
        ))
    })
}

pub fn peft_name(module: &str, which: &str) -> String {
    format!(
        "base_model.model.{}",
        crate::model::adapter_name(module, which)
    )
}

impl Decoder {
    pub fn has_adapter(&self) -> bool {
        self.lora_config.is_some()
    }

    /// An adapter is attached and not folded into the base weights.
    pub fn has_unmerged_adapter(&self) -> bool {
        self.linears()
            .iter()
            .any(|l| l.lora.as_ref().is_some_and(|a| !a.merged))
    }

    /// Attaches fresh adapters (PEFT init) to every targeted linear.
    pub fn add_lora(&mut self, cfg: LoraConfig, seed: u64) -> Result<usize> {
        cfg.validate()?;
        let targets = self.targeted(&cfg)?;
        let mut bytes = Some(0u64);
        for (_, in_f, out_f) in &targets {
            let n = (*in_f as u64 + *out_f as u64)
                .checked_mul(cfg.r as u64)
                .and_then(|n| n.checked_mul(4));
            bytes = bytes.zip(n).and_then(|(a, b)| a.checked_add(b));
        }
        crate::limits::check_bytes("lora", "r", &format!("rank {} adapters", cfg.r), bytes)?;
        let mut rng = Rng::new(seed);
        let (dev, r) = (self.device.clone(), cfg.r);
        self.attach(cfg, &targets, |_, in_f, out_f| {
            // kaiming_uniform_(a=sqrt(5)) on [r, in]: bound = sqrt(6 / ((1 + 5) * fan_in)) = 1/sqrt(in).
            let bound = 1.0 / (in_f as f64).sqrt();
            let a: Vec<f32> = (0..r * in_f)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect();
            Ok((
                Tensor::from_vec(a, (r, in_f), &dev)?,
                Tensor::zeros((out_f, r), candle_core::DType::F32, &dev)?,
            ))
        })
    }

    /// The (name, in, out) of every linear `cfg` targets, before anything is allocated: refused
    /// when an adapter is already attached or when no linear matches.
    fn targeted(&mut self, cfg: &LoraConfig) -> Result<Vec<(String, usize, usize)>> {
        if self.has_adapter() {
            return Err(Error::Input(
                "an adapter is already attached (merge or remove it first)".into(),
            ));
        }
        let arch = self.spec.architecture;
        let linears = self.linears_mut();
        let targets: Vec<_> = linears
            .iter()
            .filter(|l| cfg.targets(&l.name))
            .map(|l| (l.name.clone(), l.in_features(), l.out_features()))
            .collect();
        if targets.is_empty() {
            let mut modules: Vec<&str> = linears
                .iter()
                .map(|l| l.name.rsplit('.').next().unwrap_or(""))
                .collect();
            modules.sort();
            modules.dedup();
            return Err(Error::config(
                "lora",
                "target_modules",
                format!(
                    "{:?} matches no linear layer of this {} model (its modules: {})",
                    cfg.target_modules,
                    arch.as_str(),
                    modules.join(", ")
                ),
            ));
        }
        Ok(targets)
    }

    /// Gives each of `targets` the adapter `make(name, in, out)` returns as (A, B); all of them
    /// are made before any is attached, so a failure leaves the model as it was.
    fn attach(
        &mut self,
        cfg: LoraConfig,
        targets: &[(String, usize, usize)],
        mut make: impl FnMut(&str, usize, usize) -> Result<(Tensor, Tensor)>,
    ) -> Result<usize> {
        let mut made = HashMap::new();
        for (name, in_f, out_f) in targets {
            made.insert(name.as_str(), make(name, *in_f, *out_f)?);
        }
        let (scaling, dropout) = (cfg.scaling(), cfg.dropout);
        for lin in self.linears_mut() {
            if let Some((a, b)) = made.remove(lin.name.as_str()) {
                lin.lora = Some(Lora {
                    a,
                    b,
                    scaling,
                    dropout,
                    merged: false,
                });
            }
        }
        self.lora_config = Some(cfg);
        Ok(targets.len())
    }

    fn adapted(&mut self) -> Result<Vec<&mut Linear>> {
        if !self.has_adapter() {
            return Err(Error::Input("no adapter is attached".into()));
        }
        Ok(self
            .linears_mut()
            .into_iter()
            .filter(|l| l.lora.is_some())
            .collect())
    }

    /// Folds `s * B A` into each adapted base weight; the adapter stays attached but inactive.
    pub fn merge_adapter(&mut self) -> Result<()> {
        for lin in self.adapted()? {
            let lora = lin.lora.as_mut().unwrap();
            if !lora.merged {
                let w = float_base(&lin.name, &mut lin.weight)?;
                *w = (&*w + lora.delta()?.detach())?;
                lora.merged = true;
            }
        }
        Ok(())
    }

    pub fn unmerge_adapter(&mut self) -> Result<()> {
        for lin in self.adapted()? {
            let lora = lin.lora.as_mut().unwrap();
            if lora.merged {
                let w = float_base(&lin.name, &mut lin.weight)?;
                *w = (&*w - lora.delta()?.detach())?;
                lora.merged = false;
            }
        }
        Ok(())
    }

    /// Drops the adapters (after a merge, the merged weights stay).
    pub fn remove_adapter(&mut self) {
        for lin in self.linears_mut() {
            lin.lora = None;
        }
        self.lora_config = None;
    }

    /// Writes the adapter in PEFT's format.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self
            .lora_config
            .as_ref()
            .ok_or_else(|| Error::Input("no adapter is attached".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = HashMap::new();
        let mut modules = vec![];
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                tensors.insert(
                    peft_name(&lin.name, "lora_A"),
                    l.a.detach().to_device(&Device::Cpu)?.contiguous()?,
                );
                tensors.insert(
                    peft_name(&lin.name, "lora_B"),
                    l.b.detach().to_device(&Device::Cpu)?.contiguous()?,
                );
                modules.push(lin.name.rsplit('.').next().unwrap_or("").to_string());
            }
        }
        crate::weights::write_atomic(&dir.join("adapter_model.safetensors"), |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(Error::from)
        })?;
        let target: Value = if cfg.target_modules.iter().any(|t| t == "all-linear") {
            modules.sort();
            modules.dedup();
            json!(modules)
        } else {
            let mut t = cfg.target_modules.clone();
            t.sort();
            json!(t)
        };
        let peft = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "target_modules": target,
            "layers_to_transform": cfg.layers_to_transform,
            "bias": "none",
            "fan_in_fan_out": self.spec.architecture == Architecture::Gpt2,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "use_dora": false,
            "base_model_name_or_path": self.config.get("_name_or_path").cloned().unwrap_or(Value::Null),
        });
        let text = serde_json::to_string_pretty(&peft).map_err(|e| Error::Msg(e.to_string()))?;
        crate::weights::write_atomic(&dir.join("adapter_config.json"), |tmp| {
            std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e))
        })
    }

    /// Attaches an adapter saved by PEFT or by `save_adapter`.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<usize> {
        let cfg_path = dir.join("adapter_config.json");
        let v = crate::weights::hf::read_json(&cfg_path)?;
        let ctx = cfg_path.display().to_string();
        if let Some(t) = v.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(Error::config(
                    &ctx,
                    "peft_type",
                    format!("only LORA adapters are supported, got {t}"),
                ));
            }
        }
        if v.get("use_dora").and_then(|d| d.as_bool()) == Some(true) {
            return Err(Error::config(
                &ctx,
                "use_dora",
                "DoRA adapters are not supported",
            ));
        }
        refuse_unsupported_fields(&v, &ctx, self.spec.architecture)?;
        let num = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_f64())
                .ok_or_else(|| Error::config(&ctx, k, "missing or not a number"))
        };
        let targets: Vec<String> = match v.get("target_modules") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
            _ => return Err(Error::config(&ctx, "target_modules", "missing")),
        };
        let layers = v.get("layers_to_transform").and_then(|l| match l {
            Value::Number(n) => n.as_u64().map(|x| vec![x as usize]),
            Value::Array(a) => Some(
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect(),
            ),
            _ => None,
        });
        let r = v
            .get("r")
            .and_then(|x| x.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| {
                Error::config(
                    &ctx,
                    "r",
                    format!(
                        "must be a positive integer, got {}",
                        v.get("r").unwrap_or(&Value::Null)
                    ),
                )
            })? as usize;
        let use_rslora = match v.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Error::config(
                    &ctx,
                    "use_rslora",
                    format!("must be true or false, got {other}"),
                ))
            }
        };
        let dropout = match v.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(x) => x.as_f64().ok_or_else(|| {
                Error::config(&ctx, "lora_dropout", format!("must be a number, got {x}"))
            })?,
        };
        let cfg = LoraConfig {
            r,
            alpha: num("lora_alpha")?,
            dropout,
            use_rslora,
            target_modules: targets,
            layers_to_transform: layers,
        };
        // The same checks as `add_lora`, under the names this file gives the fields.
        cfg.validate().map_err(|e| match e {
            Error::Config { key, msg, .. } => {
                let key = if key == "dropout" {
                    "lora_dropout".into()
                } else {
                    key
                };
                Error::config(&ctx, key, msg)
            }
            other => other,
        })?;
        let targets = self.targeted(&cfg).map_err(|e| match e {
            Error::Config { key, msg, .. } => Error::config(&ctx, key, msg),
            other => other,
        })?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(Error::NotFound(file));
        }
        let saved = candle_core::safetensors::load(&file, &self.device).map_err(|e| {
            Error::Weights(format!(
                "{}: not a readable safetensors file: {e}",
                file.display()
            ))
        })?;
        // PEFT may write the adapter name into the keys (`lora_A.default.weight`).
        let saved: HashMap<String, Tensor> = saved
            .into_iter()
            .map(|(k, t)| (k.replace(".default.weight", ".weight"), t))
            .collect();
        // Every tensor is checked against the modules the config targets before anything is
        // attached: the adapter is built from the file's tensors, never allocated from `r`.
        let mut problems = vec![];
        for (name, in_f, out_f) in &targets {
            for (which, want) in [("lora_A", [r, *in_f]), ("lora_B", [*out_f, r])] {
                let key = peft_name(name, which);
                match saved.get(&key) {
                    None => problems.push(format!("missing tensor `{key}`")),
                    Some(t) if t.dims() != want => problems.push(format!(
                        "tensor `{key}` has shape {:?}, expected {want:?} ({ctx} says r = {r})",
                        t.dims(),
                    )),
                    Some(_) => {}
                }
            }
        }
        let used: usize = 2 * targets.len();
        if problems.is_empty() && used < saved.len() {
            let known: Vec<String> = self
                .named_parameters()
                .into_iter()
                .map(|(n, _)| format!("base_model.model.{n}"))
                .collect();
            for k in saved.keys() {
                if !known.contains(k) && !k.contains("lora_") {
                    problems.push(format!("unexpected tensor `{k}`"));
                }
            }
            if problems.is_empty() {
                problems.push(format!(
                    "{} adapter tensor(s) match no targeted module",
                    saved.len() - used
                ));
            }
        }
        if !problems.is_empty() {
            return Err(Error::Weights(format!(
                "{}: {} problem(s):\n  {}",
                file.display(),
                problems.len(),
                problems.join("\n  ")
            )));
        }
        let f32 = candle_core::DType::F32;
        self.attach(cfg, &targets, |name, _, _| {
            Ok((
                saved[&peft_name(name, "lora_A")].to_dtype(f32)?,
                saved[&peft_name(name, "lora_B")].to_dtype(f32)?,
            ))
        })
    }
}

/// PEFT fields that would change the adapter's meaning but are not implemented here: refused,
/// naming the field, rather than silently ignored.
fn refuse_unsupported_fields(v: &Value, ctx: &str, arch: Architecture) -> Result<()> {
    let set = |k: &str| match v.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    for k in [
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "modules_to_save",
    ] {
        if set(k) {
            return Err(Error::config(
                ctx,
                k,
                format!(
                    "is not supported (got {}); only one rank and alpha for every targeted module",
                    v[k]
                ),
            ));
        }
    }
    // GPT-2's Conv1D stores weights transposed, which is what PEFT's fan_in_fan_out describes.
    if set("fan_in_fan_out") && arch != Architecture::Gpt2 {
        return Err(Error::config(
            ctx,
            "fan_in_fan_out",
            "true is only meaningful for GPT-2's Conv1D layers",
        ));
    }
    match v.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(other) => {
            return Err(Error::config(
                ctx,
                "bias",
                format!("only \"none\" is supported, got {other}"),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targeting_by_name_and_layer() {
        let cfg = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["q_proj".into()],
            layers_to_transform: Some(vec![1]),
        };
        assert!(cfg.targets("model.layers.1.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.0.self_attn.q_proj"));
        assert!(!cfg.targets("model.layers.1.self_attn.k_proj"));
        assert_eq!(layer_index("transformer.h.3.attn.c_attn"), Some(3));
        let fused = LoraConfig {
            target_modules: vec!["qkv_proj".into(), "gate_up_proj".into()],
            ..cfg.clone()
        };
        assert!(fused.targets("model.layers.1.self_attn.qkv_proj"));
        assert!(fused.targets("model.layers.1.mlp.gate_up_proj"));
        assert!(!fused.targets("model.layers.0.mlp.gate_up_proj"));
        assert_eq!(cfg.scaling(), 2.0);
        let rs = LoraConfig {
            use_rslora: true,
            r: 4,
            ..cfg
        };
        assert_eq!(rs.scaling(), 2.0);
    }
}

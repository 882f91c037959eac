//! AdamW with torch's semantics: per-parameter step counts, bias correction, decoupled weight
//! decay applied before the moment update, and state that saves and loads exactly.
//!
//! `t += 1; p *= 1 - lr*wd; m += (1-b1)(g-m); v = b2 v + (1-b2) g²;
//!  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`

use crate::error::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameters whose name contains one of these substrings get no weight decay.
    pub no_decay: Vec<String>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            no_decay: vec![],
        }
    }
}

impl AdamWConfig {
    // Negated comparisons also reject NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, m: String| Err(Error::config("AdamW", k, m));
        if !(self.lr >= 0.0) {
            return bad("lr", format!("must be >= 0, got {}", self.lr));
        }
        for (k, b) in [("betas[0]", self.beta1), ("betas[1]", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(k, format!("must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps > 0.0) {
            return bad("eps", format!("must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        Ok(())
    }
}

struct Moments {
    m: Tensor,
    v: Tensor,
    step: u64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            state: BTreeMap::new(),
        })
    }

    fn decays(&self, name: &str) -> bool {
        !self
            .config
            .no_decay
            .iter()
            .any(|p| name.contains(p.as_str()))
    }

    /// Steps taken so far (the largest per-parameter count).
    pub fn step_count(&self) -> u64 {
        self.state.values().map(|s| s.step).max().unwrap_or(0)
    }

    /// The step count of each parameter updated so far.
    pub fn steps(&self) -> BTreeMap<String, u64> {
        self.state
            .iter()
            .map(|(k, s)| (k.clone(), s.step))
            .collect()
    }

    /// Updates every parameter that has a gradient; parameters without one are left alone,
    /// their step counts unchanged, as torch does for `grad is None`.
    pub fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &HashMap<String, Tensor>,
    ) -> Result<()> {
        let c = self.config.clone();
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let wd = if self.decays(name) {
                c.weight_decay
            } else {
                0.0
            };
            let st = match self.state.get_mut(name) {
                Some(s) => s,
                None => {
                    let z = g.zeros_like()?;
                    self.state.entry(name.clone()).or_insert(Moments {
                        m: z.clone(),
                        v: z,
                        step: 0,
                    })
                }
            };
            st.step += 1;
            let t = st.step as i32;
            let mut p = var.as_tensor().detach();
            if wd != 0.0 {
                p = p.affine(1.0 - c.lr * wd, 0.0)?;
            }
            st.m = (&st.m + (g - &st.m)?.affine(1.0 - c.beta1, 0.0)?)?;
            st.v = (st.v.affine(c.beta2, 0.0)? + (g.affine(1.0 - c.beta2, 0.0)? * g)?)?;
            let step_size = c.lr / (1.0 - c.beta1.powi(t));
            let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
            let denom = (st.v.sqrt()?.affine(1.0 / bc2_sqrt, 0.0)? + c.eps)?;
            p = (p - (&st.m / &denom)?.affine(step_size, 0.0)?)?;
            var.set(&p)?;
        }
        Ok(())
    }

    /// `optimizer.json` (hyper-parameters and step counts) + `optimizer.safetensors` (moments).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = HashMap::new();
        for (name, s) in &self.state {
            tensors.insert(format!("{name}.exp_avg"), s.m.to_device(&Device::Cpu)?);
            tensors.insert(format!("{name}.exp_avg_sq"), s.v.to_device(&Device::Cpu)?);
        }
        crate::weights::write_atomic(&dir.join("optimizer.safetensors"), |tmp| {
            candle_core::safetensors::save(&tensors, tmp).map_err(Error::from)
        })?;
        let meta = serde_json::json!({"config": self.config, "steps": self.steps()});
        let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Msg(e.to_string()))?;
        crate::weights::write_atomic(&dir.join("optimizer.json"), |tmp| {
            std::fs::write(tmp, text).map_err(|e| Error::io(tmp, e))
        })
    }

    pub fn load(&mut self, dir: &Path, device: &Device) -> Result<()> {
        let meta_path = dir.join("optimizer.json");
        let meta = crate::weights::hf::read_json(&meta_path)?;
        let ctx = meta_path.display().to_string();
        let config: AdamWConfig =
            serde_json::from_value(meta.get("config").cloned().unwrap_or_default())
                .map_err(|e| Error::config(&ctx, "config", e.to_string()))?;
        let steps: BTreeMap<String, u64> =
            serde_json::from_value(meta.get("steps").cloned().unwrap_or_default())
                .map_err(|e| Error::config(&ctx, "steps", e.to_string()))?;
        let file = dir.join("optimizer.safetensors");
        let mut tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::Weights(format!("{}: {e}", file.display())))?;
        let mut state = BTreeMap::new();
        for (name, step) in steps {
            let mut take = |suffix: &str| {
                tensors.remove(&format!("{name}.{suffix}")).ok_or_else(|| {
                    Error::Weights(format!(
                        "{}: missing tensor `{name}.{suffix}`",
                        file.display()
                    ))
                })
            };
            let (m, v) = (take("exp_avg")?, take("exp_avg_sq")?);
            state.insert(name, Moments { m, v, step });
        }
        self.config = config;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_steps_follow_the_closed_form() {
        // With g constant, m_t/(1-b1^t) = g and v_t/(1-b2^t) = g², so each step moves p by
        // lr * g/(|g| + eps) after decay.
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(cfg).unwrap();
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.5f64, -0.25], &Device::Cpu).unwrap();
        let grads: HashMap<String, Tensor> = [("w".to_string(), g)].into();
        let mut expect = [1.0f64, -2.0];
        for _ in 0..3 {
            opt.step(&[("w".into(), var.clone())], &grads).unwrap();
            for (p, gv) in expect.iter_mut().zip([0.5f64, -0.25]) {
                *p *= 1.0 - 0.1 * 0.5;
                *p -= 0.1 * gv / (gv.abs() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        assert!(
            (got[0] - expect[0]).abs() < 1e-12 && (got[1] - expect[1]).abs() < 1e-12,
            "{got:?} vs {expect:?}"
        );
        assert_eq!(opt.steps()["w"], 3);
    }

    #[test]
    fn no_decay_patterns_and_exact_state_round_trip() {
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            no_decay: vec!["bias".into()],
            ..Default::default()
        };
        let mut a = AdamW::new(cfg).unwrap();
        assert!(
            !a.decays("model.layers.0.self_attn.q_proj.bias")
                && a.decays("model.layers.0.self_attn.q_proj.weight")
        );
        let var = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap();
        let grads: HashMap<String, Tensor> = [("w".to_string(), g)].into();
        a.step(&[("w".into(), var.clone())], &grads).unwrap();
        let dir = std::env::temp_dir().join(format!("mc-adamw-{}", std::process::id()));
        a.save(&dir).unwrap();
        let mut b = AdamW::new(AdamWConfig::default()).unwrap();
        b.load(&dir, &Device::Cpu).unwrap();
        let var2 = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
        a.step(&[("w".into(), var.clone())], &grads).unwrap();
        b.step(&[("w".into(), var2.clone())], &grads).unwrap();
        assert_eq!(
            var.as_tensor().to_vec1::<f32>().unwrap(),
            var2.as_tensor().to_vec1::<f32>().unwrap()
        );
        assert_eq!(b.config, a.config);
        std::fs::remove_dir_all(dir).ok();
    }
}

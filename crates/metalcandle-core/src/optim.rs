//! Optimizers with torch's semantics and state that saves and loads exactly. Per-parameter
//! step counts; parameters without a gradient are left alone.
//!
//! AdamW: `t += 1; p *= 1 - lr*wd; m += (1-b1)(g-m); v = b2 v + (1-b2) g²;
//!  p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`
//! SGD (torch.optim.SGD, dampening 0): `g += wd*p; buf = g (first step) or mu*buf + g;
//!  p -= lr * (nesterov ? g + mu*buf : buf)`
//! Lion: `p *= 1 - lr*wd; p -= lr * sign(b1 m + (1-b1) g); m = b2 m + (1-b2) g`

use crate::error::{Error, Result};
use candle_core::{Device, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "name")]
pub enum Algorithm {
    #[default]
    AdamW,
    Sgd {
        momentum: f64,
        nesterov: bool,
    },
    Lion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    #[serde(default)]
    pub algorithm: Algorithm,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Parameters whose name contains one of these substrings get no weight decay.
    pub no_decay: Vec<String>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::AdamW,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            no_decay: vec![],
        }
    }
}

impl OptimizerConfig {
    // Negated comparisons also reject NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, m: String| Err(Error::config("optimizer", k, m));
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
        if let Algorithm::Sgd { momentum, nesterov } = self.algorithm {
            if !(momentum >= 0.0) {
                return bad("momentum", format!("must be >= 0, got {momentum}"));
            }
            if nesterov && momentum == 0.0 {
                return bad("nesterov", "needs momentum > 0".into());
            }
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

/// Per-parameter state: the first moment (AdamW, Lion) or momentum buffer (SGD), and the
/// second moment (AdamW only). AdamW's moments of a CPU f32 parameter live in `host` instead,
/// updated in place with the parameter; `m` and `v` then stay `None`.
struct Moments {
    m: Option<Tensor>,
    v: Option<Tensor>,
    host: Option<HostMoments>,
    step: u64,
    /// The file the moments were read from, to name it if they do not fit their parameter.
    source: Option<String>,
}

impl Moments {
    /// Moments read from a file must have the shape of the parameter they are named for; a
    /// float dtype other than the parameter's (a hand-edited file) is converted, as the
    /// update's arithmetic needs one dtype.
    fn fit(&mut self, name: &str, var: &Var) -> Result<()> {
        for (which, t) in [("exp_avg", &mut self.m), ("exp_avg_sq", &mut self.v)] {
            let Some(m) = t.as_mut() else { continue };
            if m.dims() != var.dims() {
                return Err(Error::Weights(format!(
                    "{}: tensor `{name}.{which}` has shape {:?}, but parameter `{name}` has shape {:?}",
                    self.source.as_deref().unwrap_or("optimizer state"),
                    m.dims(),
                    var.dims()
                )));
            }
            if m.dtype() != var.dtype() {
                *m = m.to_dtype(var.dtype())?;
            }
        }
        Ok(())
    }
}

struct HostMoments {
    m: Vec<f32>,
    v: Vec<f32>,
    shape: Shape,
}

/// One step's gradients: a tensor per parameter (the composed path), or slices of one flat
/// buffer at the given offsets (the fused path), which the update reads without a copy.
pub enum Grads<'a> {
    Tensors(&'a HashMap<String, Tensor>),
    Flat {
        buf: &'a [f32],
        at: &'a HashMap<String, usize>,
    },
}

enum Grad<'a> {
    Tensor(&'a Tensor),
    Slice(&'a [f32]),
}

impl Grads<'_> {
    fn get(&self, name: &str, numel: usize) -> Option<Grad<'_>> {
        match self {
            Grads::Tensors(map) => map.get(name).map(Grad::Tensor),
            Grads::Flat { buf, at } => at.get(name).map(|&o| Grad::Slice(&buf[o..o + numel])),
        }
    }
}

pub struct Optimizer {
    pub config: OptimizerConfig,
    state: BTreeMap<String, Moments>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Result<Self> {
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
        self.step_with(params, &Grads::Tensors(grads))
    }

    /// [`Optimizer::step`] over either kind of gradient.
    pub fn step_with(&mut self, params: &[(String, Var)], grads: &Grads) -> Result<()> {
        let c = self.config.clone();
        for (name, var) in params {
            let Some(g) = grads.get(name, var.elem_count()) else {
                continue;
            };
            let wd = if self.decays(name) {
                c.weight_decay
            } else {
                0.0
            };
            let st = self.state.entry(name.clone()).or_insert(Moments {
                m: None,
                v: None,
                host: None,
                step: 0,
                source: None,
            });
            st.fit(name, var)?;
            st.step += 1;
            if c.algorithm == Algorithm::AdamW && crate::ops::adamw::applies(var.as_tensor()) {
                match g {
                    Grad::Slice(g) => adamw_in_place(&c, wd, st, var, g)?,
                    Grad::Tensor(g) => {
                        let mut g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
                        // The update writes the parameter while it reads the gradient: one
                        // storage for both would wait on its own lock.
                        if crate::ops::shares_storage(&g, var.as_tensor()) {
                            g = g.copy()?;
                        }
                        let (s, l) = g.storage_and_layout();
                        let candle_core::Storage::Cpu(s) = &*s else {
                            return Err(Error::Msg(format!("{name}: gradient not on the CPU")));
                        };
                        adamw_in_place(&c, wd, st, var, crate::ops::slice(s, l)?)?;
                    }
                }
                continue;
            }
            let g = match g {
                Grad::Tensor(g) => g.clone(),
                Grad::Slice(g) => Tensor::from_slice(g, var.shape(), var.device())?,
            };
            let p = var.as_tensor().detach();
            let p = match c.algorithm {
                Algorithm::AdamW => adamw(&c, wd, st, &p, &g)?,
                Algorithm::Sgd { momentum, nesterov } => {
                    sgd(&c, wd, momentum, nesterov, st, &p, &g)?
                }
                Algorithm::Lion => lion(&c, wd, st, &p, &g)?,
            };
            var.set(&p)?;
        }
        Ok(())
    }

    /// `optimizer.json` (hyper-parameters and step counts) + `optimizer.safetensors` (moments).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = HashMap::new();
        for (name, s) in &self.state {
            if let Some(h) = &s.host {
                let dev = &Device::Cpu;
                let m = Tensor::from_slice(&h.m, &h.shape, dev)?;
                tensors.insert(format!("{name}.exp_avg"), m);
                let v = Tensor::from_slice(&h.v, &h.shape, dev)?;
                tensors.insert(format!("{name}.exp_avg_sq"), v);
            }
            if let Some(m) = &s.m {
                tensors.insert(format!("{name}.exp_avg"), m.to_device(&Device::Cpu)?);
            }
            if let Some(v) = &s.v {
                tensors.insert(format!("{name}.exp_avg_sq"), v.to_device(&Device::Cpu)?);
            }
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
        let config: OptimizerConfig =
            serde_json::from_value(meta.get("config").cloned().unwrap_or_default())
                .map_err(|e| Error::config(&ctx, "config", e.to_string()))?;
        // As Optimizer::new checks it: a saved file edited to eps = 0 or a NaN lr would
        // otherwise load and turn every parameter it updates into NaN.
        config.validate().map_err(|e| match e {
            Error::Config { key, msg, .. } => Error::config(&ctx, format!("config.{key}"), msg),
            other => other,
        })?;
        let steps: BTreeMap<String, u64> =
            serde_json::from_value(meta.get("steps").cloned().unwrap_or_default())
                .map_err(|e| Error::config(&ctx, "steps", e.to_string()))?;
        let file = dir.join("optimizer.safetensors");
        let mut tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::Weights(format!("{}: {e}", file.display())))?;
        let mut state = BTreeMap::new();
        for (name, step) in steps {
            // Bias correction raises beta to the step count as an i32.
            if step > i32::MAX as u64 {
                return Err(Error::config(
                    &ctx,
                    format!("steps.{name}"),
                    format!("{step} is more than {} steps", i32::MAX),
                ));
            }
            let m = tensors.remove(&format!("{name}.exp_avg"));
            let v = tensors.remove(&format!("{name}.exp_avg_sq"));
            for (which, t) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
                if let Some(t) = t.as_ref().filter(|t| !t.dtype().is_float()) {
                    return Err(Error::Weights(format!(
                        "{}: tensor `{name}.{which}` is {:?}, expected a float dtype",
                        file.display(),
                        t.dtype()
                    )));
                }
            }
            let needs_v = config.algorithm == Algorithm::AdamW;
            let needs_m =
                !matches!(config.algorithm, Algorithm::Sgd { momentum, .. } if momentum == 0.0);
            if (needs_m && m.is_none()) || (needs_v && v.is_none()) {
                let which = if needs_m && m.is_none() {
                    "exp_avg"
                } else {
                    "exp_avg_sq"
                };
                return Err(Error::Weights(format!(
                    "{}: missing tensor `{name}.{which}`",
                    file.display()
                )));
            }
            state.insert(
                name,
                Moments {
                    m,
                    v,
                    host: None,
                    step,
                    source: Some(file.display().to_string()),
                },
            );
        }
        self.config = config;
        self.state = state;
        Ok(())
    }
}

/// AdamW on the CPU in one in-place pass, with no allocation after the first step: the same
/// arithmetic, in the same order, as the tensor expression below, so both give the same bits.
/// Moments loaded from a checkpoint move to the host on their first step.
fn adamw_in_place(
    c: &OptimizerConfig,
    wd: f64,
    st: &mut Moments,
    var: &Var,
    g: &[f32],
) -> Result<()> {
    use crate::ops::adamw::{Hyper, OnParameter};
    let host = match st.host.take() {
        Some(h) => h,
        None => {
            let host = |t: &Option<Tensor>| -> Result<Vec<f32>> {
                Ok(match t {
                    Some(t) => t
                        .to_dtype(candle_core::DType::F32)?
                        .flatten_all()?
                        .to_vec1()?,
                    None => vec![0.0; g.len()],
                })
            };
            HostMoments {
                m: host(&st.m.take())?,
                v: host(&st.v.take())?,
                shape: var.shape().clone(),
            }
        }
    };
    let HostMoments {
        mut m,
        mut v,
        shape,
    } = host;
    let t = st.step as i32;
    let op = OnParameter {
        grad: g,
        moments: std::cell::RefCell::new((&mut m, &mut v)),
        hyper: Hyper {
            c1: (1.0 - c.beta1) as f32,
            beta2: c.beta2 as f32,
            c2: (1.0 - c.beta2) as f32,
            decay: (wd != 0.0).then_some((1.0 - c.lr * wd) as f32),
            step_size: (c.lr / (1.0 - c.beta1.powi(t))) as f32,
            inv_bc2: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
            eps: c.eps as f32,
        },
    };
    let result = var.as_tensor().inplace_op1(&op);
    st.host = Some(HostMoments { m, v, shape });
    Ok(result?)
}

fn adamw(c: &OptimizerConfig, wd: f64, st: &mut Moments, p: &Tensor, g: &Tensor) -> Result<Tensor> {
    let t = st.step as i32;
    let mut p = p.clone();
    if wd != 0.0 {
        p = p.affine(1.0 - c.lr * wd, 0.0)?;
    }
    let m = match &st.m {
        Some(m) => (m + (g - m)?.affine(1.0 - c.beta1, 0.0)?)?,
        None => g.affine(1.0 - c.beta1, 0.0)?,
    };
    let gg = (g.affine(1.0 - c.beta2, 0.0)? * g)?;
    let v = match &st.v {
        Some(v) => (v.affine(c.beta2, 0.0)? + gg)?,
        None => gg,
    };
    let step_size = c.lr / (1.0 - c.beta1.powi(t));
    let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
    let denom = (v.sqrt()?.affine(1.0 / bc2_sqrt, 0.0)? + c.eps)?;
    let p = (p - (&m / &denom)?.affine(step_size, 0.0)?)?;
    (st.m, st.v) = (Some(m), Some(v));
    Ok(p)
}

fn sgd(
    c: &OptimizerConfig,
    wd: f64,
    momentum: f64,
    nesterov: bool,
    st: &mut Moments,
    p: &Tensor,
    g: &Tensor,
) -> Result<Tensor> {
    let g = if wd != 0.0 {
        (g + p.affine(wd, 0.0)?)?
    } else {
        g.clone()
    };
    let d = if momentum != 0.0 {
        let buf = match &st.m {
            Some(b) => (b.affine(momentum, 0.0)? + &g)?,
            None => g.clone(),
        };
        let d = if nesterov {
            (&g + buf.affine(momentum, 0.0)?)?
        } else {
            buf.clone()
        };
        st.m = Some(buf);
        d
    } else {
        g
    };
    Ok((p - d.affine(c.lr, 0.0)?)?)
}

fn lion(c: &OptimizerConfig, wd: f64, st: &mut Moments, p: &Tensor, g: &Tensor) -> Result<Tensor> {
    let mut p = p.clone();
    if wd != 0.0 {
        p = p.affine(1.0 - c.lr * wd, 0.0)?;
    }
    let m = match &st.m {
        Some(m) => m.clone(),
        None => g.zeros_like()?,
    };
    let update = (m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?.sign()?;
    let p = (p - update.affine(c.lr, 0.0)?)?;
    st.m = Some((m.affine(c.beta2, 0.0)? + g.affine(1.0 - c.beta2, 0.0)?)?);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn first_steps_follow_the_closed_form() {
        // With g constant, m_t/(1-b1^t) = g and v_t/(1-b2^t) = g², so each step moves p by
        // lr * g/(|g| + eps) after decay.
        let cfg = OptimizerConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = Optimizer::new(cfg).unwrap();
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
    fn no_decay_names_parameters_by_substring() {
        let a = Optimizer::new(OptimizerConfig {
            no_decay: vec!["bias".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(
            !a.decays("model.layers.0.self_attn.q_proj.bias")
                && a.decays("model.layers.0.self_attn.q_proj.weight")
        );
    }

    fn run(algorithm: Algorithm, wd: f64, steps: usize) -> Vec<f64> {
        let mut opt = Optimizer::new(OptimizerConfig {
            algorithm,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: wd,
            ..Default::default()
        })
        .unwrap();
        let var = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        for k in 0..steps {
            // A gradient that changes sign, so momentum and sign updates are exercised.
            let s = if k % 2 == 0 { 1.0 } else { -0.5 };
            let g = Tensor::new(&[0.5f64 * s, -0.25], &Device::Cpu).unwrap();
            let grads: HashMap<String, Tensor> = [("w".to_string(), g)].into();
            opt.step(&[("w".into(), var.clone())], &grads).unwrap();
        }
        var.as_tensor().to_vec1::<f64>().unwrap()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn sgd_with_momentum_and_nesterov_follow_torch() {
        // By hand, torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.1), dampening 0.
        let grads = |k: usize| {
            let s = if k.is_multiple_of(2) { 1.0 } else { -0.5 };
            [0.5 * s, -0.25]
        };
        for nesterov in [false, true] {
            let mut p = [1.0f64, -2.0];
            let mut buf: Option<[f64; 2]> = None;
            for k in 0..3 {
                let g0 = grads(k);
                let g = [g0[0] + 0.1 * p[0], g0[1] + 0.1 * p[1]];
                let b = match buf {
                    Some(b) => [0.9 * b[0] + g[0], 0.9 * b[1] + g[1]],
                    None => g,
                };
                buf = Some(b);
                let d = if nesterov {
                    [g[0] + 0.9 * b[0], g[1] + 0.9 * b[1]]
                } else {
                    b
                };
                p = [p[0] - 0.1 * d[0], p[1] - 0.1 * d[1]];
            }
            let got = run(
                Algorithm::Sgd {
                    momentum: 0.9,
                    nesterov,
                },
                0.1,
                3,
            );
            assert!(close(&got, &p), "nesterov={nesterov}: {got:?} vs {p:?}");
        }
    }

    #[test]
    fn lion_moves_each_entry_by_lr_times_a_sign() {
        // Step 1: m = 0, so the update is sign(g); step 2: sign(0.9*0.01*g1 + 0.1*g2).
        let got = run(Algorithm::Lion, 0.5, 2);
        let mut p = [1.0f64, -2.0];
        let (g1, g2) = ([0.5f64, -0.25], [-0.25f64, -0.25]);
        for i in 0..2 {
            p[i] = p[i] * (1.0 - 0.1 * 0.5) - 0.1 * g1[i].signum();
            let m = 0.01 * g1[i];
            p[i] = p[i] * (1.0 - 0.1 * 0.5) - 0.1 * (0.9 * m + 0.1 * g2[i]).signum();
        }
        assert!(close(&got, &p), "{got:?} vs {p:?}");
    }

    #[test]
    fn every_algorithm_round_trips_its_state_exactly() {
        let sgd = Algorithm::Sgd {
            momentum: 0.9,
            nesterov: true,
        };
        for (i, algorithm) in [Algorithm::AdamW, Algorithm::Lion, sgd]
            .into_iter()
            .enumerate()
        {
            let cfg = OptimizerConfig {
                algorithm,
                weight_decay: 0.5,
                no_decay: vec!["bias".into()],
                ..Default::default()
            };
            let mut a = Optimizer::new(cfg.clone()).unwrap();
            let var = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
            let g = Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap();
            let grads: HashMap<String, Tensor> = [("w".to_string(), g)].into();
            a.step(&[("w".into(), var.clone())], &grads).unwrap();
            let dir = std::env::temp_dir().join(format!("mc-opt-{}-{i}", std::process::id()));
            a.save(&dir).unwrap();
            let mut b = Optimizer::new(OptimizerConfig::default()).unwrap();
            b.load(&dir, &Device::Cpu).unwrap();
            assert_eq!(b.config, cfg);
            let var2 = Var::from_tensor(&var.as_tensor().copy().unwrap()).unwrap();
            a.step(&[("w".into(), var.clone())], &grads).unwrap();
            b.step(&[("w".into(), var2.clone())], &grads).unwrap();
            assert_eq!(
                var.as_tensor().to_vec1::<f32>().unwrap(),
                var2.as_tensor().to_vec1::<f32>().unwrap(),
                "{algorithm:?}"
            );
            std::fs::remove_dir_all(dir).ok();
        }
    }

    #[test]
    fn flat_gradients_update_like_tensors() {
        // Two parameters read from one buffer at their offsets, one parameter left out.
        let dev = Device::Cpu;
        let cfg = OptimizerConfig {
            weight_decay: 0.1,
            no_decay: vec!["b".into()],
            ..Default::default()
        };
        for algorithm in [Algorithm::AdamW, Algorithm::Lion] {
            let cfg = OptimizerConfig {
                algorithm,
                ..cfg.clone()
            };
            let init = |n| Tensor::randn(0f32, 1.0, n, &dev).unwrap();
            let (w, b, u) = (init(20_000), init(7), init(5));
            let params = |t: [&Tensor; 3]| -> Vec<(String, Var)> {
                ["w", "b", "u"]
                    .iter()
                    .zip(t)
                    .map(|(n, t)| (n.to_string(), Var::from_tensor(&t.copy().unwrap()).unwrap()))
                    .collect()
            };
            let (pa, pb) = (params([&w, &b, &u]), params([&w, &b, &u]));
            let (mut a, mut f) = (
                Optimizer::new(cfg.clone()).unwrap(),
                Optimizer::new(cfg).unwrap(),
            );
            for _ in 0..3 {
                let flat = init(20_007).to_vec1::<f32>().unwrap();
                let at: HashMap<String, usize> = [("w".into(), 0), ("b".into(), 20_000)].into();
                let grads: HashMap<String, Tensor> = [
                    (
                        "w".into(),
                        Tensor::from_slice(&flat[..20_000], 20_000, &dev).unwrap(),
                    ),
                    (
                        "b".into(),
                        Tensor::from_slice(&flat[20_000..], 7, &dev).unwrap(),
                    ),
                ]
                .into();
                a.step(&pa, &grads).unwrap();
                f.step_with(
                    &pb,
                    &Grads::Flat {
                        buf: &flat,
                        at: &at,
                    },
                )
                .unwrap();
            }
            for ((n, x), (_, y)) in pa.iter().zip(&pb) {
                let (x, y) = (x.as_tensor(), y.as_tensor());
                assert_eq!(
                    x.to_vec1::<f32>().unwrap(),
                    y.to_vec1::<f32>().unwrap(),
                    "{n}"
                );
            }
            assert_eq!(f.steps(), [("b".into(), 3), ("w".into(), 3)].into());
            let unchanged = pb[2].1.as_tensor().to_vec1::<f32>().unwrap();
            assert_eq!(unchanged, u.to_vec1::<f32>().unwrap());
        }
    }

    #[test]
    fn in_place_adamw_gives_the_bits_of_the_tensor_expression() {
        let cfg = OptimizerConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..Default::default()
        };
        let dev = Device::Cpu;
        let p0 = Tensor::randn(0f32, 1.0, 70_000, &dev).unwrap();
        let var = Var::from_tensor(&p0).unwrap();
        let mut opt = Optimizer::new(cfg.clone()).unwrap();
        let mut reference = p0.clone();
        let mut st = Moments {
            m: None,
            v: None,
            host: None,
            step: 0,
            source: None,
        };
        for _ in 0..3 {
            let g = Tensor::randn(0f32, 1.0, 70_000, &dev).unwrap();
            let grads: HashMap<String, Tensor> = [("w".to_string(), g.clone())].into();
            opt.step(&[("w".into(), var.clone())], &grads).unwrap();
            st.step += 1;
            reference = adamw(&cfg, 0.1, &mut st, &reference, &g).unwrap();
        }
        assert_eq!(
            var.as_tensor().to_vec1::<f32>().unwrap(),
            reference.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn a_saved_config_is_checked_when_loaded() {
        let dir = std::env::temp_dir().join(format!("mc-optim-load-{}", std::process::id()));
        let opt = Optimizer::new(OptimizerConfig::default()).unwrap();
        opt.save(&dir).unwrap();
        edit_meta(&dir, |meta| meta["config"]["eps"] = serde_json::json!(0.0));
        let e = load_error(&dir);
        assert!(
            e.contains("optimizer.json") && e.contains("config.eps"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    fn load_error(dir: &Path) -> String {
        let mut opt = Optimizer::new(OptimizerConfig::default()).unwrap();
        opt.load(dir, &Device::Cpu).unwrap_err().to_string()
    }

    fn edit_meta(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
        let path = dir.join("optimizer.json");
        let mut meta = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut meta);
        std::fs::write(&path, meta.to_string()).unwrap();
    }

    /// An AdamW state saved after one step on `w` ([3]), its moments then rewritten by `edit`.
    fn saved_state(tag: &str, edit: impl Fn(&mut HashMap<String, Tensor>)) -> std::path::PathBuf {
        saved_state_of(OptimizerConfig::default(), tag, edit)
    }

    fn saved_state_of(
        config: OptimizerConfig,
        tag: &str,
        edit: impl Fn(&mut HashMap<String, Tensor>),
    ) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mc-optim-{tag}-{}", std::process::id()));
        let var = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let grads: HashMap<String, Tensor> = [("w".to_string(), var.as_tensor().clone())].into();
        let mut opt = Optimizer::new(config).unwrap();
        opt.step(&[("w".into(), var)], &grads).unwrap();
        opt.save(&dir).unwrap();
        let file = dir.join("optimizer.safetensors");
        let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        edit(&mut t);
        candle_core::safetensors::save(&t, &file).unwrap();
        dir
    }

    #[test]
    fn loaded_moments_must_fit_their_parameter() {
        let dir = saved_state("shape", |t| {
            t.insert(
                "w.exp_avg".into(),
                Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
            );
        });
        let mut opt = Optimizer::new(OptimizerConfig::default()).unwrap();
        opt.load(&dir, &Device::Cpu).unwrap();
        let var = Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
        let grads: HashMap<String, Tensor> = [("w".to_string(), var.as_tensor().clone())].into();
        let e = opt
            .step(&[("w".into(), var)], &grads)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("optimizer.safetensors") && e.contains("`w.exp_avg` has shape [5]"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();

        let dir = saved_state("dtype", |t| {
            t.insert(
                "w.exp_avg_sq".into(),
                Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap(),
            );
        });
        let e = load_error(&dir);
        assert!(
            e.contains("optimizer.safetensors") && e.contains("`w.exp_avg_sq` is U8"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn loaded_moments_of_another_float_dtype_take_the_parameters() {
        let lion = OptimizerConfig {
            algorithm: Algorithm::Lion,
            ..Default::default()
        };
        let half = |t: &mut HashMap<String, Tensor>| {
            let m = t["w.exp_avg"].to_dtype(DType::F16).unwrap();
            t.insert("w.exp_avg".into(), m);
        };
        let step = |dir: &Path| {
            let mut opt = Optimizer::new(lion.clone()).unwrap();
            opt.load(dir, &Device::Cpu).unwrap();
            let var =
                Var::from_tensor(&Tensor::ones(3, DType::F32, &Device::Cpu).unwrap()).unwrap();
            let grads: HashMap<String, Tensor> =
                [("w".to_string(), var.as_tensor().affine(0.5, 0.0).unwrap())].into();
            opt.step(&[("w".into(), var.clone())], &grads).unwrap();
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        let (f32_dir, f16_dir) = (
            saved_state_of(lion.clone(), "lion32", |_| {}),
            saved_state_of(lion.clone(), "lion16", half),
        );
        // Lion's update is a sign: the moment rounded to f16 moves the parameter the same way.
        assert_eq!(step(&f16_dir), step(&f32_dir));
        std::fs::remove_dir_all(f32_dir).ok();
        std::fs::remove_dir_all(f16_dir).ok();
    }

    #[test]
    fn a_step_count_beyond_the_bias_correction_is_refused() {
        let dir = saved_state("steps", |_| {});
        edit_meta(&dir, |meta| {
            meta["steps"]["w"] = serde_json::json!(1u64 << 40)
        });
        let e = load_error(&dir);
        assert!(e.contains("optimizer.json") && e.contains("steps.w"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }
}

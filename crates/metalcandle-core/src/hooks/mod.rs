//! Intervention points in the decoder, for research on learning dynamics.
//!
//! Points: `embed`, `layers.N.attn_in`, `layers.N.attn_scores` and `layers.N.attn_probs`
//! ([B, heads, T, keys]; scores after the mask), `layers.N.attn_out`, `layers.N.mlp_out`,
//! `layers.N.residual` (the stream after block N), `final_norm`, `logits`. Patterns may use `*`.
//! The names of the points and of the built-in kinds with their parameters are in `vocab`.
//!
//! At a point, the forward actions run in the order they were added; then the backward
//! actions wrap the result, so they see the gradient arriving at the point's output first.
//! With no hook attached a point costs one branch: its name is never even formatted.

pub mod aux;
pub mod grad;
pub mod update;
pub mod vocab;

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::weights::names::glob_match;
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use aux::AuxLoss;
pub use grad::BackwardAction;
pub use update::GradTransform;
pub use vocab::{vocabulary, POINTS_AFTER, POINTS_BEFORE, POINTS_IN_A_LAYER};

/// A user function on a point's value: Some(replacement) or None to keep it.
pub type ForwardFn = Arc<dyn Fn(&str, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;

#[derive(Clone)]
pub enum ForwardAction {
    /// Keeps the value (`full`) or its summary statistics, readable after the forward.
    Capture {
        full: bool,
    },
    Scale(f64),
    /// Adds `std` x N(0, 1), drawn from (seed, training step, point, call).
    Noise {
        std: f64,
        seed: u64,
    },
    /// Zeroes heads of a [B, heads, T, keys] point (attn_probs removes their contribution).
    AblateHeads(Vec<usize>),
    Clamp {
        min: f64,
        max: f64,
    },
    /// Replaces the value by a stored activation of the same shape. Nothing flows upstream
    /// through the replacement unless a straight-through backward hook sits at the point.
    Patch(Tensor),
    /// Replacement values from user code carry no graph: the gradient passes them straight
    /// through (as if the function were the identity), `y = x + (f(x) - x).detach()`.
    Custom(ForwardFn),
}

impl std::fmt::Debug for ForwardAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ForwardAction::Custom(_) => write!(f, "Custom(fn)"),
            ForwardAction::Patch(t) => write!(f, "Patch({:?})", t.dims()),
            ForwardAction::Capture { full } => write!(f, "Capture {{ full: {full} }}"),
            ForwardAction::Scale(s) => write!(f, "Scale({s})"),
            ForwardAction::Noise { std, seed } => write!(f, "Noise({std}, {seed})"),
            ForwardAction::AblateHeads(h) => write!(f, "AblateHeads({h:?})"),
            ForwardAction::Clamp { min, max } => write!(f, "Clamp({min}, {max})"),
        }
    }
}

/// Summary statistics of a captured value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    pub shape: Vec<usize>,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub absmax: f64,
}

#[derive(Debug, Clone)]
pub enum Captured {
    Full(Tensor),
    Stats(Stats),
}

#[derive(Clone)]
struct Entry<A> {
    id: u64,
    pattern: String,
    action: A,
}

impl<A> Entry<A> {
    /// Appends the hook `id` to `list`; returns its id.
    fn push(list: &mut Vec<Entry<A>>, id: u64, pattern: &str, action: A) -> u64 {
        list.push(Entry {
            id,
            pattern: pattern.into(),
            action,
        });
        id
    }
}

/// The hooks attached to a model. Cloning shares the captured values and the step counter,
/// so the detached views the forward runs on report into the same place.
#[derive(Clone, Default)]
pub struct Hooks {
    next_id: u64,
    forward: Vec<Entry<ForwardAction>>,
    backward: Vec<Entry<BackwardAction>>,
    aux: Vec<(u64, AuxLoss)>,
    update: Vec<(u64, String, GradTransform)>,
    /// The latest value each capture hook recorded at each point, by (hook id, point).
    captured: Arc<Mutex<BTreeMap<(u64, String), Captured>>>,
    /// Values at aux-loss points during the current loss forward, by aux id; gathered only
    /// while a loss is computed, so inference never accumulates them.
    collected: Arc<Mutex<Vec<(u64, Tensor)>>>,
    collecting: Arc<std::sync::atomic::AtomicBool>,
    /// The optimizer step being computed, and calls within it, for reproducible noise.
    step: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("forward", &self.forward.len())
            .field("backward", &self.backward.len())
            .field("aux", &self.aux.len())
            .field("update", &self.update.len())
            .finish()
    }
}

/// Every point name of a model with `layers` blocks, in the order a forward reaches them.
pub fn point_names(layers: usize) -> Vec<String> {
    let mut out: Vec<String> = POINTS_BEFORE.iter().map(|p| p.to_string()).collect();
    for i in 0..layers {
        for p in POINTS_IN_A_LAYER {
            out.push(format!("layers.{i}.{p}"));
        }
    }
    out.extend(POINTS_AFTER.iter().map(|p| p.to_string()));
    out
}

impl Hooks {
    /// Whether any point needs visiting during a forward.
    pub fn active(&self) -> bool {
        !self.forward.is_empty()
            || !self.backward.is_empty()
            || self.aux.iter().any(|(_, a)| a.point().is_some())
    }

    /// Whether a forward or backward hook, or an aux loss, visits `point`.
    pub fn touches(&self, point: &str) -> bool {
        self.forward.iter().any(|e| glob_match(&e.pattern, point))
            || self.backward.iter().any(|e| glob_match(&e.pattern, point))
            || self
                .aux
                .iter()
                .any(|(_, a)| a.point().is_some_and(|p| glob_match(p, point)))
    }

    /// Whether anything (a forward or backward hook, or an aux loss) needs the logits as a
    /// tensor; when nothing does, training never materializes them.
    pub fn needs_logits(&self) -> bool {
        self.forward
            .iter()
            .any(|e| glob_match(&e.pattern, "logits"))
            || self
                .backward
                .iter()
                .any(|e| glob_match(&e.pattern, "logits"))
            || self
                .aux
                .iter()
                .any(|(_, a)| matches!(a, AuxLoss::ZLoss { .. }))
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Checks that `pattern` names at least one point of a model with `layers` blocks.
    pub fn check_point(pattern: &str, layers: usize) -> Result<()> {
        if point_names(layers).iter().any(|p| glob_match(pattern, p)) {
            return Ok(());
        }
        Err(Error::Input(format!(
            "hook point \"{pattern}\" matches no point of this model (points: {}, layers.N.{{{}}} \
             for N < {layers}, {})",
            POINTS_BEFORE.join(", "),
            POINTS_IN_A_LAYER.join(","),
            POINTS_AFTER.join(", ")
        )))
    }

    pub fn add_forward(&mut self, pattern: &str, action: ForwardAction) -> u64 {
        let id = self.id();
        Entry::push(&mut self.forward, id, pattern, action)
    }

    pub fn add_backward(&mut self, pattern: &str, action: BackwardAction) -> u64 {
        let id = self.id();
        Entry::push(&mut self.backward, id, pattern, action)
    }

    pub fn add_aux(&mut self, loss: AuxLoss) -> u64 {
        let id = self.id();
        self.aux.push((id, loss));
        id
    }

    pub fn add_update(&mut self, pattern: &str, t: GradTransform) -> u64 {
        let id = self.id();
        self.update.push((id, pattern.into(), t));
        id
    }

    /// Detaches hook `id`; false if no hook has that id.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.forward.len() + self.backward.len() + self.aux.len() + self.update.len();
        self.forward.retain(|e| e.id != id);
        self.backward.retain(|e| e.id != id);
        self.aux.retain(|(i, _)| *i != id);
        self.update.retain(|(i, _, _)| *i != id);
        before != self.forward.len() + self.backward.len() + self.aux.len() + self.update.len()
    }

    pub fn clear(&mut self) {
        self.forward.clear();
        self.backward.clear();
        self.aux.clear();
        self.update.clear();
    }

    pub fn aux_losses(&self) -> &[(u64, AuxLoss)] {
        &self.aux
    }

    pub fn update_transforms(&self) -> &[(u64, String, GradTransform)] {
        &self.update
    }

    /// What capture hooks recorded, by point (the latest forward's value).
    pub fn take_captured(&self) -> BTreeMap<(u64, String), Captured> {
        std::mem::take(&mut *self.captured.lock().unwrap())
    }

    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::SeqCst);
        self.calls.store(0, Ordering::SeqCst);
    }

    /// A generator for one noise draw: the same (seed, step, point, call) gives the same noise,
    /// so a resumed run draws what the uninterrupted one did.
    fn noise_rng(&self, seed: u64, point: &str) -> Rng {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in point.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let step = self.step.load(Ordering::SeqCst);
        Rng::new(seed ^ h ^ step.wrapping_mul(crate::rng::GOLDEN) ^ call.rotate_left(32))
    }

    pub(crate) fn noise_like(
        &self,
        x: &Tensor,
        std: f64,
        seed: u64,
        point: &str,
    ) -> Result<Tensor> {
        let mut rng = self.noise_rng(seed, point);
        let v: Vec<f32> = (0..x.elem_count())
            .map(|_| (rng.normal() * std) as f32)
            .collect();
        Ok(Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }

    pub(crate) fn take_collected(&self) -> Vec<(u64, Tensor)> {
        std::mem::take(&mut *self.collected.lock().unwrap())
    }

    /// Starts or stops gathering the values aux losses read.
    pub(crate) fn set_collecting(&self, on: bool) {
        self.collecting.store(on, Ordering::SeqCst);
        if !on {
            self.take_collected();
        }
    }

    /// Runs the hooks that match `point` on `x`.
    pub fn apply(&self, point: &str, x: Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        let backward: Vec<&BackwardAction> = self
            .backward
            .iter()
            .filter(|e| glob_match(&e.pattern, point))
            .map(|e| &e.action)
            .collect();
        let straight = backward
            .iter()
            .any(|a| matches!(a, BackwardAction::StraightThrough));
        let mut changed = false;
        for e in self
            .forward
            .iter()
            .filter(|e| glob_match(&e.pattern, point))
        {
            let (next, did) = self.forward_action(e.id, point, &e.action, y)?;
            y = next;
            changed |= did;
        }
        if straight && changed {
            y = (&x + (y - &x)?.detach())?;
        }
        for a in backward {
            y = grad::apply(self, point, a, y)?;
        }
        let wanted: Vec<u64> = self
            .aux
            .iter()
            .filter(|(_, a)| a.point().is_some_and(|p| glob_match(p, point)))
            .map(|(id, _)| *id)
            .collect();
        if !wanted.is_empty() && self.collecting.load(Ordering::SeqCst) {
            let mut c = self.collected.lock().unwrap();
            c.extend(wanted.into_iter().map(|id| (id, y.clone())));
        }
        Ok(y)
    }

    /// One forward action; returns the new value and whether it may differ from the input.
    fn forward_action(
        &self,
        id: u64,
        point: &str,
        a: &ForwardAction,
        y: Tensor,
    ) -> Result<(Tensor, bool)> {
        Ok(match a {
            ForwardAction::Capture { full } => {
                let c = if *full {
                    Captured::Full(y.detach())
                } else {
                    Captured::Stats(stats(&y)?)
                };
                self.captured.lock().unwrap().insert((id, point.into()), c);
                (y, false)
            }
            ForwardAction::Scale(s) => (y.affine(*s, 0.0)?, *s != 1.0),
            ForwardAction::Clamp { min, max } => (y.clamp(*min, *max)?, true),
            ForwardAction::Noise { std, seed } => {
                let n = self.noise_like(&y, *std, *seed, point)?;
                ((y + n)?, true)
            }
            ForwardAction::AblateHeads(heads) => {
                let dims = y.dims().to_vec();
                if dims.len() != 4 {
                    return Err(Error::Input(format!(
                        "ablate_heads at \"{point}\": needs a [batch, heads, T, keys] point \
                         (attn_scores or attn_probs), got shape {dims:?}"
                    )));
                }
                if let Some(h) = heads.iter().find(|&&h| h >= dims[1]) {
                    return Err(Error::Input(format!(
                        "ablate_heads at \"{point}\": head {h} out of range (the layer has {} heads)",
                        dims[1]
                    )));
                }
                let keep: Vec<f32> = (0..dims[1])
                    .map(|h| if heads.contains(&h) { 0.0 } else { 1.0 })
                    .collect();
                let keep =
                    Tensor::from_vec(keep, (1, dims[1], 1, 1), y.device())?.to_dtype(y.dtype())?;
                (y.broadcast_mul(&keep)?, true)
            }
            ForwardAction::Patch(t) => {
                if t.dims() != y.dims() {
                    return Err(Error::Input(format!(
                        "patch at \"{point}\": stored activation has shape {:?}, the point has {:?}",
                        t.dims(),
                        y.dims()
                    )));
                }
                (t.to_device(y.device())?.to_dtype(y.dtype())?, true)
            }
            ForwardAction::Custom(f) => match f(point, &y)? {
                None => (y, false),
                Some(r) => {
                    if r.dims() != y.dims() {
                        return Err(Error::Input(format!(
                            "hook at \"{point}\" returned shape {:?}, expected {:?}",
                            r.dims(),
                            y.dims()
                        )));
                    }
                    let r = r.to_device(y.device())?.to_dtype(y.dtype())?;
                    ((&y + (r - &y)?.detach())?, true)
                }
            },
        })
    }
}

fn stats(x: &Tensor) -> Result<Stats> {
    let v: Vec<f64> = x.detach().to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n;
    let (min, max) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    Ok(Stats {
        shape: x.dims().to_vec(),
        mean,
        std: var.sqrt(),
        min,
        max,
        absmax: min.abs().max(max.abs()),
    })
}

#[cfg(test)]
mod tests;

//! Backward hooks: an identity in the forward whose backward rewrites the gradient arriving
//! at a point before it flows upstream.

use super::Hooks;
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Arc;

/// A user function on the gradient at a point, returning the gradient to pass upstream.
pub type GradFn = Arc<dyn Fn(&str, &Tensor) -> Result<Tensor> + Send + Sync>;

#[derive(Clone)]
pub enum BackwardAction {
    Scale(f64),
    /// Clamps each gradient entry to [-c, c].
    ClipValue(f64),
    /// Rescales the gradient at the point to norm at most c.
    ClipNorm(f64),
    /// Nothing flows upstream of the point.
    StopGradient,
    /// The forward actions at the point are skipped by the gradient (identity backward).
    StraightThrough,
    Noise {
        std: f64,
        seed: u64,
    },
    Custom(GradFn),
}

impl std::fmt::Debug for BackwardAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackwardAction::Scale(s) => write!(f, "Scale({s})"),
            BackwardAction::ClipValue(c) => write!(f, "ClipValue({c})"),
            BackwardAction::ClipNorm(c) => write!(f, "ClipNorm({c})"),
            BackwardAction::StopGradient => write!(f, "StopGradient"),
            BackwardAction::StraightThrough => write!(f, "StraightThrough"),
            BackwardAction::Noise { std, seed } => write!(f, "Noise({std}, {seed})"),
            BackwardAction::Custom(_) => write!(f, "Custom(fn)"),
        }
    }
}

struct GradHook {
    hooks: Hooks,
    point: String,
    action: BackwardAction,
}

fn copy_cpu(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("gradient hook: input must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        _ => candle_core::bail!("gradient hook: float tensors only"),
    })
}

impl CustomOp1 for GradHook {
    fn name(&self) -> &'static str {
        "gradient-hook"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((copy_cpu(s, l)?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let to_candle = candle_core::Error::from;
        Ok(Some(match &self.action {
            BackwardAction::Scale(s) => g.affine(*s, 0.0)?,
            BackwardAction::ClipValue(c) => g.clamp(-*c, *c)?,
            BackwardAction::ClipNorm(c) => {
                let n = crate::ops::frobenius(g)?;
                if n > *c {
                    g.affine(*c / n, 0.0)?
                } else {
                    g.clone()
                }
            }
            BackwardAction::Noise { std, seed } => {
                let n = self
                    .hooks
                    .noise_like(g, *std, *seed, &self.point)
                    .map_err(to_candle)?;
                (g + n)?
            }
            BackwardAction::Custom(f) => {
                let r = f(&self.point, g).map_err(to_candle)?;
                if r.dims() != g.dims() {
                    return Err(to_candle(crate::Error::Input(format!(
                        "backward hook at \"{}\" returned shape {:?}, expected {:?}",
                        self.point,
                        r.dims(),
                        g.dims()
                    ))));
                }
                r.to_dtype(g.dtype())?.to_device(g.device())?
            }
            BackwardAction::StopGradient | BackwardAction::StraightThrough => {
                unreachable!("handled without the op")
            }
        }))
    }
}

pub(super) fn apply(hooks: &Hooks, point: &str, a: &BackwardAction, y: Tensor) -> Result<Tensor> {
    Ok(match a {
        BackwardAction::StopGradient => y.detach(),
        BackwardAction::StraightThrough => y,
        _ => y.contiguous()?.apply_op1(GradHook {
            hooks: hooks.clone(),
            point: point.into(),
            action: a.clone(),
        })?,
    })
}

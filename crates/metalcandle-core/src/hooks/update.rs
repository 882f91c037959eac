//! Update-rule hooks: transforms of each parameter's gradient between the backward pass and
//! the optimizer (before global-norm clipping, as a user editing `.grad` in torch would).

use super::Hooks;
use crate::error::Result;
use crate::ops::frobenius;
use crate::weights::names::glob_match;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

/// A user function `(name, param, grad) -> grad`.
pub type UpdateFn = Arc<dyn Fn(&str, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

#[derive(Clone)]
pub enum GradTransform {
    /// Clamps each entry to [-c, c].
    ClipValue(f64),
    /// Rescales each parameter's gradient to norm at most c.
    ClipNorm(f64),
    Noise {
        std: f64,
        seed: u64,
    },
    /// sign(g), as in signSGD.
    Sign,
    /// g / ||g|| (zero gradients stay zero).
    Normalize,
    /// Subtracts the mean over every axis but the first (gradient centralization), for
    /// parameters of rank 2 and more.
    Centralize,
    /// No gradient: the optimizer leaves the parameter and its state alone.
    Freeze,
    Custom(UpdateFn),
}

impl std::fmt::Debug for GradTransform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GradTransform::ClipValue(c) => write!(f, "ClipValue({c})"),
            GradTransform::ClipNorm(c) => write!(f, "ClipNorm({c})"),
            GradTransform::Noise { std, seed } => write!(f, "Noise({std}, {seed})"),
            GradTransform::Sign => write!(f, "Sign"),
            GradTransform::Normalize => write!(f, "Normalize"),
            GradTransform::Centralize => write!(f, "Centralize"),
            GradTransform::Freeze => write!(f, "Freeze"),
            GradTransform::Custom(_) => write!(f, "Custom(fn)"),
        }
    }
}

impl Hooks {
    /// Applies the update transforms, in the order they were added, to `grads` (by name).
    pub fn transform_grads(
        &self,
        params: &HashMap<String, Tensor>,
        grads: &mut HashMap<String, Tensor>,
    ) -> Result<()> {
        for (_, pattern, t) in self.update_transforms() {
            let names: Vec<String> = grads
                .keys()
                .filter(|n| glob_match(pattern, n))
                .cloned()
                .collect();
            for name in names {
                let g = grads.remove(&name).unwrap();
                let out = match t {
                    GradTransform::Freeze => continue,
                    GradTransform::ClipValue(c) => g.clamp(-*c, *c)?,
                    GradTransform::ClipNorm(c) => {
                        let n = frobenius(&g)?;
                        if n > *c {
                            g.affine(*c / n, 0.0)?
                        } else {
                            g
                        }
                    }
                    GradTransform::Noise { std, seed } => {
                        let n = self.noise_like(&g, *std, *seed, &name)?;
                        (g + n)?
                    }
                    GradTransform::Sign => g.sign()?,
                    GradTransform::Normalize => {
                        let n = frobenius(&g)?;
                        if n > 0.0 {
                            g.affine(1.0 / n, 0.0)?
                        } else {
                            g
                        }
                    }
                    GradTransform::Centralize if g.rank() >= 2 => {
                        let dims: Vec<usize> = (1..g.rank()).collect();
                        g.broadcast_sub(&g.mean_keepdim(dims)?)?
                    }
                    GradTransform::Centralize => g,
                    GradTransform::Custom(f) => {
                        let p = &params[&name];
                        let r = f(&name, p, &g)?;
                        if r.dims() != g.dims() {
                            return Err(crate::Error::Input(format!(
                                "update hook returned a gradient of shape {:?} for `{name}`, expected {:?}",
                                r.dims(),
                                g.dims()
                            )));
                        }
                        r.to_dtype(g.dtype())?.to_device(g.device())?
                    }
                };
                grads.insert(name, out);
            }
        }
        Ok(())
    }
}

//! In-place AdamW passes over CPU storage. The tensor expression allocates a new buffer for
//! each of its dozen elementwise ops, every step, for every parameter; a full fine-tune of a
//! 25M-parameter model then spends more time in page faults than in the update. Each pass here
//! repeats the expression's arithmetic in the same order (candle's `affine(a, b)` is
//! `x * a + b`), so the two give the same bits.

use super::{slice, Elem, PAR_MIN_ELEMS};
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Whether the in-place passes can run: contiguous CPU f32/f64 parameter and gradient.
pub fn applies(p: &Tensor, g: &Tensor) -> bool {
    super::use_cpu_kernel(p) && p.dtype() == g.dtype() && p.is_contiguous() && p.dims() == g.dims()
}

fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("adamw: parameter and state must be contiguous"),
    }
}

/// `xs[i] = f(xs[i], i)`, in parallel blocks when large.
fn update<T: Elem>(xs: &mut [T], f: impl Fn(T, usize) -> T + Sync) {
    const BLOCK: usize = 1 << 14;
    let run = |(bi, block): (usize, &mut [T])| {
        for (j, x) in block.iter_mut().enumerate() {
            *x = f(*x, bi * BLOCK + j);
        }
    };
    if xs.len() >= PAR_MIN_ELEMS {
        xs.par_chunks_mut(BLOCK).enumerate().for_each(run);
    } else {
        xs.chunks_mut(BLOCK).enumerate().for_each(run);
    }
}

pub enum MomentUpdate {
    /// `m = m + ((g - m) * c + 0)`
    First { c: f64 },
    /// `v = (v * b2 + 0) + ((g * c + 0) * g)`
    Second { b2: f64, c: f64 },
}

impl MomentUpdate {
    fn run<T: Elem>(&self, m: &mut [T], g: &[T]) {
        let zero = T::zero();
        match *self {
            MomentUpdate::First { c } => {
                let c = T::from(c).unwrap();
                update(m, |m, i| m + ((g[i] - m) * c + zero));
            }
            MomentUpdate::Second { b2, c } => {
                let (b2, c) = (T::from(b2).unwrap(), T::from(c).unwrap());
                update(m, |v, i| (v * b2 + zero) + ((g[i] * c + zero) * g[i]));
            }
        }
    }
}

impl InplaceOp2 for MomentUpdate {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let r = range(l1)?;
        match s1 {
            CpuStorage::F32(m) => self.run::<f32>(&mut m[r], slice(s2, l2)?),
            CpuStorage::F64(m) => self.run::<f64>(&mut m[r], slice(s2, l2)?),
            _ => candle_core::bail!("adamw: f32 or f64 state expected"),
        }
        Ok(())
    }
}

/// `p = (p * decay + 0) - ((m / ((sqrt(v) * inv_bc2 + 0) + eps)) * step_size + 0)`
pub struct ParamUpdate {
    pub decay: Option<f64>,
    pub step_size: f64,
    pub inv_bc2: f64,
    pub eps: f64,
}

impl ParamUpdate {
    fn run<T: Elem>(&self, p: &mut [T], m: &[T], v: &[T]) {
        let zero = T::zero();
        let t = |x: f64| T::from(x).unwrap();
        let (step, inv_bc2, eps) = (t(self.step_size), t(self.inv_bc2), t(self.eps));
        let decay = self.decay.map(t);
        update(p, |p, i| {
            let p = match decay {
                Some(d) => p * d + zero,
                None => p,
            };
            let denom = (v[i].sqrt() * inv_bc2 + zero) + eps;
            p - ((m[i] / denom) * step + zero)
        });
    }
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let r = range(l1)?;
        match s1 {
            CpuStorage::F32(p) => self.run::<f32>(&mut p[r], slice(s2, l2)?, slice(s3, l3)?),
            CpuStorage::F64(p) => self.run::<f64>(&mut p[r], slice(s2, l2)?, slice(s3, l3)?),
            _ => candle_core::bail!("adamw: f32 or f64 parameter expected"),
        }
        Ok(())
    }
}

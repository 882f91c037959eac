//! AdamW in one in-place pass over CPU memory. The tensor expression allocates a new buffer for
//! each of its dozen elementwise ops, every step, for every parameter; a full fine-tune of a
//! 25M-parameter model then spends more time in page faults than in the update. Separate
//! passes for m, v and p would read the gradient and the moments twice; here each element's
//! m, v and p are updated together. The arithmetic repeats the expression's, in the same order
//! (candle's `affine(a, b)` is `x * a + b`), so the two give the same bits.

use super::PAR_MIN_ELEMS;
use candle_core::{CpuStorage, InplaceOp1, Layout, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Whether the in-place pass can run: a contiguous CPU f32 parameter.
pub fn applies(p: &Tensor) -> bool {
    super::use_cpu_kernel(p) && p.dtype() == candle_core::DType::F32 && p.is_contiguous()
}

/// One step's constants, as f32 the way candle's `affine` rounds its f64 arguments.
pub struct Hyper {
    /// `1 - beta1`
    pub c1: f32,
    pub beta2: f32,
    /// `1 - beta2`
    pub c2: f32,
    /// `1 - lr * weight_decay`, when the parameter decays
    pub decay: Option<f32>,
    /// `lr / (1 - beta1^t)`
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`
    pub inv_bc2: f32,
    pub eps: f32,
}

/// `m = m + ((g - m) * c1 + 0)`; `v = (v * b2 + 0) + ((g * c2 + 0) * g)`;
/// `p = (p * decay + 0) - ((m / ((sqrt(v) * inv_bc2 + 0) + eps)) * step_size + 0)`.
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *m += (g - *m) * h.c1 + 0.0;
        *v = (*v * h.beta2 + 0.0) + ((g * h.c2 + 0.0) * g);
        let decayed = match h.decay {
            Some(d) => *p * d + 0.0,
            None => *p,
        };
        let denom = (v.sqrt() * h.inv_bc2 + 0.0) + h.eps;
        *p = decayed - ((*m / denom) * h.step_size + 0.0);
    }
}

/// The pass over the whole parameter, in parallel blocks when large.
pub fn step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &Hyper) {
    const BLOCK: usize = 1 << 14;
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len());
    if p.len() < PAR_MIN_ELEMS {
        return update(p, g, m, v, h);
    }
    p.par_chunks_mut(BLOCK)
        .zip(g.par_chunks(BLOCK))
        .zip(m.par_chunks_mut(BLOCK))
        .zip(v.par_chunks_mut(BLOCK))
        .for_each(|(((p, g), m), v)| update(p, g, m, v, h));
}

/// [`step`] on a parameter tensor's own storage; the moments live on the host beside it.
pub struct OnParameter<'a> {
    pub grad: &'a [f32],
    pub moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    pub hyper: Hyper,
}

impl InplaceOp1 for OnParameter<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (CpuStorage::F32(p), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("adamw: a contiguous f32 parameter expected")
        };
        let (m, v) = &mut *self.moments.borrow_mut();
        if self.grad.len() != b - a || m.len() != b - a || v.len() != b - a {
            candle_core::bail!(
                "adamw: parameter of {} elements, gradient {}, moments {} and {}",
                b - a,
                self.grad.len(),
                m.len(),
                v.len()
            )
        }
        step(&mut p[a..b], self.grad, m, v, &self.hyper);
        Ok(())
    }
}

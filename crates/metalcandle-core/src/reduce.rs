//! Sums across data-parallel workers. A training step on N workers equals one step on the whole
//! batch when the label-token count, the loss sum and the gradients are summed over the workers
//! before clipping and the optimizer update, which then run identically everywhere.

use crate::error::Result;

pub trait GradReducer {
    /// Sums `values` over all workers in place (token counts, loss and aux sums).
    fn sum_f64(&mut self, values: &mut [f64]) -> Result<()>;
    /// Sums one flat gradient buffer over all workers in place: one call per step, not one
    /// per tensor.
    fn sum_f32(&mut self, values: &mut [f32]) -> Result<()>;
}

//! Mean cross-entropy over rows whose label is not `IGNORE_INDEX`, from logits, with backward
//! `(softmax - onehot) / n_valid`.

use super::{
    by_dtype, cpu_tensor, dispatch_float, for_each_row, lane_max, lane_sum, slice, with_slices,
    Elem,
};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType, D};

pub const IGNORE_INDEX: i64 = -100;

struct CrossEntropy {
    labels: Vec<i64>,
}

impl CrossEntropy {
    fn n_valid(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// One row's cross-entropy against `label`, in place: the logits become `exp(x - max)`, and,
/// with `scale`, the gradient `(softmax - onehot) * scale`. The exp pass and the sums are
/// separate so each vectorizes. The fused LM head (head_loss.rs) runs the same function, so a
/// step that materialises the logits (a `logits` hook) gives the same bits as one that does not.
pub(crate) fn xent_row<T: Elem>(row: &mut [T], label: usize, scale: Option<T>) -> T {
    let (max, target) = (lane_max(row), row[label]);
    for x in row.iter_mut() {
        *x = (*x - max).exp_fast();
    }
    let sum = lane_sum(row);
    if let Some(scale) = scale {
        let c = scale / sum;
        for x in row.iter_mut() {
            *x *= c;
        }
        row[label] -= scale;
    }
    max + sum.ln() - target
}

fn forward<T: Elem>(x: &[T], labels: &[i64], v: usize, n_valid: usize) -> T {
    let mut row_loss = vec![T::zero(); labels.len()];
    for_each_row(&mut row_loss, 1, |i, o| {
        if labels[i] != IGNORE_INDEX {
            let mut row = x[i * v..(i + 1) * v].to_vec();
            o[0] = xent_row(&mut row, labels[i] as usize, None);
        }
    });
    row_loss.iter().copied().sum::<T>() / T::from(n_valid.max(1)).unwrap()
}

fn backward<T: Elem>(x: &[T], labels: &[i64], v: usize, scale: f64) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    let scale = T::from(scale).unwrap();
    for_each_row(&mut dx, v, |i, o| {
        let label = labels[i];
        if label == IGNORE_INDEX {
            return;
        }
        o.copy_from_slice(&x[i * v..(i + 1) * v]);
        xent_row(o, label as usize, Some(scale));
    });
    dx
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let v = l.dims()[1];
        dispatch_float!(s, "cross-entropy", |s: T| {
            let loss = forward::<T>(slice(s, l)?, &self.labels, v, self.n_valid());
            Ok((T::to_cpu_storage_owned(vec![loss]), Shape::from(())))
        })
    }

    fn bwd(&self, x: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let v = x.dim(D::Minus1)?;
        let scale =
            g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? / self.n_valid().max(1) as f64;
        let dx = by_dtype!(x.dtype(), "cross-entropy", |T| with_slices::<T, _>(
            &[x],
            |s| { cpu_tensor(backward(s[0], &self.labels, v, scale), x.shape()) }
        )?);
        Ok(Some(dx))
    }
}

/// Composed expression (differentiable on every device).
pub fn cross_entropy_composed(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let keep: Vec<u32> = (0..labels.len() as u32)
        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
        .collect();
    let targets: Vec<u32> = keep.iter().map(|&i| labels[i as usize] as u32).collect();
    let dev = logits.device();
    let rows = logits.index_select(&Tensor::new(keep.as_slice(), dev)?, 0)?;
    let logp = candle_nn::ops::log_softmax(&rows, D::Minus1)?;
    let picked = logp.gather(&Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?, 1)?;
    picked.neg()?.mean_all()
}

/// Mean cross-entropy of `logits` [N, V] against `labels` (N ids, `IGNORE_INDEX` skipped).
pub fn cross_entropy(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if labels.len() != n {
        candle_core::bail!(
            "cross-entropy: {} labels for {n} rows of logits",
            labels.len()
        );
    }
    if let Some(bad) = labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v))
    {
        candle_core::bail!("cross-entropy: label {bad} is outside the vocabulary [0, {v})");
    }
    if super::use_cpu_kernel(logits) {
        return logits.contiguous()?.apply_op1(CrossEntropy {
            labels: labels.to_vec(),
        });
    }
    cross_entropy_composed(logits, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::check_grads;
    use crate::testing::rand_tensor;

    #[test]
    fn matches_composed_expression_and_ignores_labels() {
        let x = (rand_tensor(&[5, 7], 1) * 4.0).unwrap();
        let labels = [3, IGNORE_INDEX, 0, 6, IGNORE_INDEX];
        let a = cross_entropy(&x, &labels)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let b = cross_entropy_composed(&x, &labels)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        // Uniform logits: loss is ln(V) whatever the labels.
        let u = Tensor::zeros((2, 7), candle_core::DType::F64, &candle_core::Device::Cpu).unwrap();
        let l = cross_entropy(&u, &[1, 2])
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((l - 7f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let labels = vec![2, IGNORE_INDEX, 0, 4];
        check_grads(
            &[(rand_tensor(&[4, 5], 2) * 2.0).unwrap()],
            |a| cross_entropy(&a[0], &labels),
            1e-6,
        );
    }
}

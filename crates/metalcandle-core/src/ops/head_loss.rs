//! The LM head and the mean cross-entropy in one op, a chunk of rows at a time, so the full
//! [N, vocab] logits, their softmax and their gradient never exist at once (for a 150k-token
//! vocabulary they are the largest tensors of a training step). The loss is the end of the
//! graph, so the forward computes the gradients too and the backward only scales them by the
//! upstream scalar.

use super::cross_entropy::{xent_row, IGNORE_INDEX};
use super::gemm::{matmul, Mat};
use super::{cpu_tensor, with_slices, Elem};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Bytes of logits computed at once: a few chunks for a 150k vocabulary and a 256-token
/// batch, so the matmuls stay large enough to run near full speed.
const CHUNK_BYTES: usize = 30 << 20;

struct Precomputed {
    loss: Tensor,
    dh: Option<Tensor>,
    dw: Option<Tensor>,
}

impl CustomOp2 for Precomputed {
    fn name(&self) -> &'static str {
        "lm-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, _) = self.loss.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(s) => Ok((s.clone(), Shape::from(()))),
            _ => candle_core::bail!("lm-head-cross-entropy: loss and input on different devices"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (s, l) = self.loss.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(s) => Ok((s.try_clone(l)?, Shape::from(()))),
            _ => candle_core::bail!("lm-head-cross-entropy: loss and input on different devices"),
        }
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let scale = |t: &Option<Tensor>| t.as_ref().map(|t| t.affine(g, 0.0)).transpose();
        Ok((scale(&self.dh)?, scale(&self.dw)?))
    }
}

/// Per row: the loss, and (when `want_grad`) the row turned in place into its gradient
/// `(softmax - onehot) * scale`, in one pass over the logits.
fn rows_loss_and_grad<T: Elem>(
    logits: &mut [T],
    labels: &[i64],
    v: usize,
    scale: T,
    want_grad: bool,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut row_loss = vec![T::zero(); labels.len()];
    logits
        .par_chunks_mut(v)
        .zip(row_loss.par_iter_mut())
        .enumerate()
        .for_each(|(i, (row, o))| {
            if labels[i] == IGNORE_INDEX {
                if want_grad {
                    row.iter_mut().for_each(|x| *x = T::zero());
                }
                return;
            }
            *o = xent_row(row, labels[i] as usize, want_grad.then_some(scale));
        });
    row_loss
}

/// The raw-slice core of the op and of the fused training path: for h [N, K] and w [V, K],
/// the loss of each row (in row order), `dh = dlogits w` written over `dh` and
/// `dw += dlogits^T h` accumulated into `dw` (when given), with dlogits = (softmax - onehot) *
/// scale. One chunk of logits exists at a time, and its gradient is written over it.
pub(crate) fn head_loss_core<T: Elem + 'static>(
    h: &[T],
    w: &[T],
    k: usize,
    labels: &[i64],
    scale: T,
    mut dh: Option<&mut [T]>,
    mut dw: Option<&mut [T]>,
) -> Vec<T> {
    let n = labels.len();
    let v = w.len() / k;
    let want_grad = dh.is_some() || dw.is_some();
    let mut row_losses: Vec<T> = Vec::with_capacity(n);
    let per_chunk = n
        .div_ceil(
            (n * v * std::mem::size_of::<T>())
                .div_ceil(CHUNK_BYTES)
                .max(1),
        )
        .max(1);
    let mut logits: Vec<T> = vec![];
    for start in (0..n).step_by(per_chunk) {
        let len = per_chunk.min(n - start);
        let labels = &labels[start..start + len];
        let hc = &h[start * k..(start + len) * k];
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            row_losses.extend(std::iter::repeat_n(T::zero(), len));
            if let Some(dh) = dh.as_deref_mut() {
                dh[start * k..(start + len) * k].fill(T::zero());
            }
            continue;
        }
        logits.resize(len * v, T::zero());
        let one = T::one();
        let (hm, wt) = (Mat::rows(hc, k), Mat::t(w, k));
        matmul(len, v, k, &mut logits, v, hm, wt, one, false, true);
        row_losses.extend(rows_loss_and_grad(&mut logits, labels, v, scale, want_grad));
        // From here `logits` holds dL/d logits.
        if let Some(dh) = dh.as_deref_mut() {
            let dh = &mut dh[start * k..(start + len) * k];
            let (gm, wm) = (Mat::rows(&logits, v), Mat::rows(w, k));
            matmul(len, k, v, dh, k, gm, wm, one, false, true);
        }
        if let Some(dw) = dw.as_deref_mut() {
            let (gt, hm) = (Mat::t(&logits, v), Mat::rows(hc, k));
            matmul(v, k, len, dw, k, gt, hm, one, true, true);
        }
    }
    row_losses
}

/// The CPU kernel. `compute_composed` keeps the same signature on purpose: it is the same
/// contract for every other device and dtype, and the caller picks one of the two per call.
fn compute<T: Elem + 'static>(
    h: &Tensor,
    w: &Tensor,
    labels: &[i64],
    need_h: bool,
    need_w: bool,
) -> Result<Precomputed> {
    let (n, k) = h.dims2()?;
    let v = w.dim(0)?;
    let n_valid = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    let scale = T::from(1.0 / n_valid.max(1) as f64).unwrap();
    let mut dh = if need_h {
        vec![T::zero(); n * k]
    } else {
        vec![]
    };
    let mut dw = if need_w {
        vec![T::zero(); v * k]
    } else {
        vec![]
    };
    let row_losses = with_slices::<T, _>(&[h, w], |s| {
        Ok(head_loss_core(
            s[0],
            s[1],
            k,
            labels,
            scale,
            need_h.then_some(&mut dh[..]),
            need_w.then_some(&mut dw[..]),
        ))
    })?;
    // Row losses summed in row order, as the unfused kernel does, so both paths give the
    // same bits.
    let loss = row_losses.into_iter().sum::<T>() / T::from(n_valid.max(1)).unwrap();
    Ok(Precomputed {
        loss: cpu_tensor(vec![loss], ())?,
        dh: need_h.then(|| cpu_tensor(dh, (n, k))).transpose()?,
        dw: need_w.then(|| cpu_tensor(dw, (v, k))).transpose()?,
    })
}

/// The same computation as tensor expressions, for any device and dtype: the label rows of a
/// chunk, their log-softmax in f32 (f64 stays f64), the loss summed on the device and the
/// gradient `(softmax - onehot) / n_valid` turned into dh and dw chunk by chunk.
fn compute_composed(
    h: &Tensor,
    w: &Tensor,
    labels: &[i64],
    need_h: bool,
    need_w: bool,
) -> Result<Precomputed> {
    use candle_core::{DType, D};
    let dev = h.device();
    let (n, _) = h.dims2()?;
    let v = w.dim(0)?;
    let keep: Vec<u32> = (0..n as u32)
        .filter(|&i| labels[i as usize] != IGNORE_INDEX)
        .collect();
    let acc = if h.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let scale = 1.0 / keep.len().max(1) as f64;
    let per_chunk = (CHUNK_BYTES / (v * acc.size_in_bytes()).max(1)).max(1);
    let mut loss = Tensor::zeros((), acc, dev)?;
    let (mut dh_rows, mut dw) = (vec![], None::<Tensor>);
    for rows in keep.chunks(per_chunk) {
        let targets: Vec<u32> = rows.iter().map(|&i| labels[i as usize] as u32).collect();
        let targets = Tensor::new(targets.as_slice(), dev)?.unsqueeze(1)?;
        let hc = h.index_select(&Tensor::new(rows, dev)?, 0)?;
        let logp = candle_nn::ops::log_softmax(&hc.matmul(&w.t()?)?.to_dtype(acc)?, D::Minus1)?;
        loss = (loss - logp.gather(&targets, 1)?.sum_all()?)?;
        if !(need_h || need_w) {
            continue;
        }
        let minus_scale = Tensor::full(-scale, (rows.len(), 1), dev)?.to_dtype(acc)?;
        let grad = logp
            .exp()?
            .affine(scale, 0.0)?
            .scatter_add(&targets, &minus_scale, 1)?
            .to_dtype(h.dtype())?;
        if need_h {
            dh_rows.push(grad.matmul(w)?);
        }
        if need_w {
            let part = grad.t()?.matmul(&hc)?;
            dw = Some(match dw {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
    }
    let dh = match (need_h, dh_rows.is_empty()) {
        (false, _) => None,
        (true, true) => Some(h.zeros_like()?),
        (true, false) => Some(h.zeros_like()?.index_add(
            &Tensor::new(keep.as_slice(), dev)?,
            &Tensor::cat(&dh_rows, 0)?,
            0,
        )?),
    };
    Ok(Precomputed {
        loss: loss.affine(scale, 0.0)?,
        dh,
        dw: match (need_w, dw) {
            (true, None) => Some(w.zeros_like()?),
            (_, dw) => dw,
        },
    })
}

/// Mean cross-entropy of `h @ w^T` [N, V] against `labels`, for h [N, H] and w [V, H]: our
/// kernel on the CPU in f32/f64, the composed chunks elsewhere (CUDA, or other dtypes).
/// Gradients reach `h` and, when it is trainable, `w`.
pub fn lm_head_cross_entropy(h: &Tensor, w: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (n, hd) = h.dims2()?;
    let (v, wd) = w.dims2()?;
    if hd != wd || labels.len() != n {
        candle_core::bail!(
            "lm-head cross-entropy: hidden {:?}, weight {:?}, {} labels",
            h.dims(),
            w.dims(),
            labels.len()
        );
    }
    if let Some(bad) = labels
        .iter()
        .find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= v))
    {
        candle_core::bail!("cross-entropy: label {bad} is outside the vocabulary [0, {v})");
    }
    let (need_h, need_w) = (h.track_op(), w.track_op());
    let (hd_, wd_) = (h.detach().contiguous()?, w.detach().contiguous()?);
    let p = if !super::use_cpu_kernel(h) {
        compute_composed(&hd_, &wd_, labels, need_h, need_w)?
    } else if h.dtype() == candle_core::DType::F32 {
        compute::<f32>(&hd_, &wd_, labels, need_h, need_w)?
    } else {
        compute::<f64>(&hd_, &wd_, labels, need_h, need_w)?
    };
    if !need_h && !need_w {
        return Ok(p.loss);
    }
    h.apply_op2(w, p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy::cross_entropy;
    use crate::ops::gradcheck::max_abs_diff;
    use crate::testing::rand_tensor;
    use candle_core::Var;

    #[test]
    fn matches_head_then_cross_entropy_with_gradients() {
        // Several chunks (about 190k rows of 11 f64 logits each), one with every label
        // ignored, and ignored rows elsewhere.
        let rows = CHUNK_BYTES / (11 * 8);
        let n = rows * 2 + 5;
        let mut labels: Vec<i64> = (0..n as i64).map(|i| (i * 7) % 11).collect();
        for l in labels.iter_mut().skip(rows + 3).take(rows - 3) {
            *l = IGNORE_INDEX;
        }
        labels[3] = IGNORE_INDEX;
        let h = Var::from_tensor(&rand_tensor(&[n, 6], 1)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[11, 6], 2)).unwrap();
        let fused = lm_head_cross_entropy(&h, &w, &labels).unwrap();
        let reference = cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &labels).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-12);
        let (gf, gr) = (
            fused.affine(3.0, 0.0).unwrap().backward().unwrap(),
            reference.affine(3.0, 0.0).unwrap().backward().unwrap(),
        );
        for v in [&h, &w] {
            let d = max_abs_diff(gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(d < 1e-12, "{d}");
        }
    }

    /// Loss and gradients of h and w, with the kernel or (`composed`) the path off the CPU.
    fn loss_and_grads(
        h: &Var,
        w: &Var,
        labels: &[i64],
        composed: bool,
    ) -> (Tensor, Tensor, Tensor) {
        let run = || {
            let loss = lm_head_cross_entropy(h, w, labels).unwrap();
            let g = loss.affine(3.0, 0.0).unwrap().backward().unwrap();
            (loss, g.get(h).unwrap().clone(), g.get(w).unwrap().clone())
        };
        if composed {
            crate::ops::device_path::run(run)
        } else {
            run()
        }
    }

    #[test]
    fn composed_path_matches_the_kernel() {
        // Two chunks of label rows on the composed path (f64), ignored rows in both.
        let rows = CHUNK_BYTES / (11 * 8);
        let n = rows + 9;
        let mut labels: Vec<i64> = (0..n as i64).map(|i| (i * 5) % 11).collect();
        for i in [0, 4, rows - 1, rows + 2] {
            labels[i] = IGNORE_INDEX;
        }
        let h = Var::from_tensor(&rand_tensor(&[n, 6], 5)).unwrap();
        let w = Var::from_tensor(&rand_tensor(&[11, 6], 6)).unwrap();
        let (lk, hk, wk) = loss_and_grads(&h, &w, &labels, false);
        let (lc, hc, wc) = loss_and_grads(&h, &w, &labels, true);
        assert!(max_abs_diff(&lk, &lc) < 1e-12);
        for (k, c) in [(&hk, &hc), (&wk, &wc)] {
            let d = max_abs_diff(k, c);
            assert!(d < 1e-12, "{d}");
        }
        // Ignored rows get a zero gradient.
        assert_eq!(
            max_abs_diff(
                &hc.get(4).unwrap(),
                &hc.get(4).unwrap().zeros_like().unwrap()
            ),
            0.0
        );
    }

    #[test]
    fn bf16_takes_the_composed_path_near_f32() {
        let labels = vec![1i64, 4, IGNORE_INDEX, 6, 0];
        let round = |t: Tensor| t.to_dtype(candle_core::DType::BF16).unwrap();
        let (h, w) = (
            round(rand_tensor(&[5, 8], 7)),
            round(rand_tensor(&[7, 8], 8)),
        );
        let f32_of = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let (hv, wv) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
        let (h32, w32) = (
            Var::from_tensor(&f32_of(&h)).unwrap(),
            Var::from_tensor(&f32_of(&w)).unwrap(),
        );
        let (l16, h16g, w16g) = loss_and_grads(&hv, &wv, &labels, false);
        let (l32, h32g, w32g) = loss_and_grads(&h32, &w32, &labels, false);
        assert_eq!(l16.dtype(), candle_core::DType::F32);
        assert_eq!(h16g.dtype(), candle_core::DType::BF16);
        // The logits come out of the bf16 matmul rounded to 8 significant bits; the loss
        // moves by at most twice that rounding of the largest logit.
        let logits = h32.matmul(&w32.t().unwrap()).unwrap();
        let bound = 2.0 * max_abs_diff(&logits, &logits.zeros_like().unwrap()) / 256.0;
        let d = max_abs_diff(&l16, &l32);
        assert!(d < bound, "{d} vs {bound}");
        // The gradients are rounded to bf16 (8 bits of mantissa) on their way out.
        for (a, b) in [(&h16g, &h32g), (&w16g, &w32g)] {
            let (a, b) = (f32_of(a), b.clone());
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(&a, &b) as f32;
            assert!(d < 1e-2 * scale, "{d} vs {scale}");
        }
    }

    #[test]
    fn frozen_weight_gets_no_gradient() {
        let labels = vec![1i64, 4, IGNORE_INDEX];
        let h = Var::from_tensor(&rand_tensor(&[3, 5], 3)).unwrap();
        let w = rand_tensor(&[7, 5], 4);
        let g = lm_head_cross_entropy(&h, &w, &labels)
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&h).is_some() && g.get(&w).is_none());
    }
}

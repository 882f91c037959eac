//! Exact causal attention over strided q/k/v (column ranges of one fused qkv buffer), with the
//! raw-slice contract of the tiled kernel (`FlashShape`, `flash_forward`, `flash_backward`),
//! so the engine calls one or the other through the same signature. One (batch, kv head)
//! group per task: its query heads share k and v, so their dk/dv sums stay in one task.
//! Scores are built per group in a [T, T] scratch and never kept: the backward recomputes the
//! probabilities from q, k and the row log-sum-exp.
//!
//! Masking equals `nn::mask::attention_mask`: query i sees key j when j <= i, j > i - window,
//! and the key is not padding; a masked score is `score + MASK_VALUE`, not -inf, so a row
//! with no visible key is uniform over all keys, as in the composed path.

use super::kernels::{matmul, Mat};
use crate::nn::mask::MASK_VALUE;
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub struct FlashShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    pub scale: f32,
}

/// A pointer that may cross into rayon tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the wrapper (Sync) rather than its field.
    fn at(&self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }
}

fn visible(s: &FlashShape, key_mask: Option<&[i64]>, b: usize, i: usize, j: usize) -> bool {
    j <= i && s.window.is_none_or(|w| j + w > i) && key_mask.is_none_or(|m| m[b * s.seq + j] != 0)
}

/// `scores[i, j] = scale * q_i . k_j + mask` for one (batch, head) into `p` [T, T].
#[allow(clippy::too_many_arguments)]
fn scores(
    s: &FlashShape,
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    k_stride: usize,
    key_mask: Option<&[i64]>,
    b: usize,
    h: usize,
    p: &mut [f32],
) {
    let (t, hd) = (s.seq, s.head_dim);
    let kvh = h / (s.heads / s.kv_heads);
    let qo = b * t * q_stride + h * hd;
    let ko = b * t * k_stride + kvh * hd;
    matmul(
        t,
        t,
        hd,
        p,
        t,
        Mat::rows(&q[qo..], q_stride),
        Mat::t(&k[ko..], k_stride),
        s.scale,
        false,
        false,
    );
    for i in 0..t {
        for j in 0..t {
            if !visible(s, key_mask, b, i, j) {
                p[i * t + j] += MASK_VALUE;
            }
        }
    }
}

/// Softmax of one row of scores in place; returns its log-sum-exp.
fn softmax_row(row: &mut [f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
    max + sum.ln()
}

/// out [batch*seq, heads*head_dim] (overwritten) and lse [batch*heads*seq].
#[allow(clippy::too_many_arguments)]
pub fn flash_forward(
    s: &FlashShape,
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    k_stride: usize,
    v: &[f32],
    v_stride: usize,
    key_mask: Option<&[i64]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (t, hd, nh) = (s.seq, s.head_dim, s.heads);
    let ld = nh * hd;
    let (outp, lsep) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    (0..s.batch * nh).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |p, bh| {
            let (b, h) = (bh / nh, bh % nh);
            scores(s, q, q_stride, k, k_stride, key_mask, b, h, p);
            // Safety: task (b, h) writes only lse[(b*nh + h)*t ..][..t] and the columns of head
            // h in the rows of batch b: disjoint across tasks.
            let lse = unsafe { std::slice::from_raw_parts_mut(lsep.at(bh * t), t) };
            for i in 0..t {
                lse[i] = softmax_row(&mut p[i * t..(i + 1) * t]);
            }
            let kvh = h / (nh / s.kv_heads);
            let out = unsafe {
                std::slice::from_raw_parts_mut(outp.at(b * t * ld + h * hd), (t - 1) * ld + hd)
            };
            matmul(
                t,
                hd,
                t,
                out,
                ld,
                Mat::rows(p, t),
                Mat::rows(&v[b * t * v_stride + kvh * hd..], v_stride),
                1.0,
                false,
                false,
            );
        },
    );
}

/// With P recomputed from q and k (the whole row again, not from lse: for a row whose keys are
/// all masked, lse = MASK_VALUE + ln(T) rounds to MASK_VALUE in f32, and exp(s - lse) would
/// give 1 instead of 1/T): dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)),
/// dQ = scale dS K, dK = scale dS^T Q. dq, dk, dv are overwritten (same layouts as q, k, v).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    s: &FlashShape,
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    k_stride: usize,
    v: &[f32],
    v_stride: usize,
    key_mask: Option<&[i64]>,
    out: &[f32],
    _lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (t, hd, nh, nkv) = (s.seq, s.head_dim, s.heads, s.kv_heads);
    let g = nh / nkv;
    let ld = nh * hd;
    let (dqp, dkp, dvp) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..s.batch * nkv).into_par_iter().for_each_init(
        || (vec![0f32; t * t], vec![0f32; t * t], vec![0f32; t]),
        |(p, dp, dsum), bk| {
            let (b, kvh) = (bk / nkv, bk % nkv);
            // Safety: group (b, kv head) writes the rows of batch b in the columns of its kv
            // head of dk/dv and of its query heads of dq: disjoint across tasks.
            let span = |stride: usize| (t - 1) * stride + hd;
            let dk = unsafe {
                std::slice::from_raw_parts_mut(dkp.at(b * t * k_stride + kvh * hd), span(k_stride))
            };
            let dv = unsafe {
                std::slice::from_raw_parts_mut(dvp.at(b * t * v_stride + kvh * hd), span(v_stride))
            };
            let kb = &k[b * t * k_stride + kvh * hd..];
            let vb = &v[b * t * v_stride + kvh * hd..];
            for (n, h) in (kvh * g..(kvh + 1) * g).enumerate() {
                scores(s, q, q_stride, k, k_stride, key_mask, b, h, p);
                let (ob, dob) = (&out[b * t * ld + h * hd..], &dout[b * t * ld + h * hd..]);
                for i in 0..t {
                    softmax_row(&mut p[i * t..(i + 1) * t]);
                    dsum[i] = (0..hd).map(|d| ob[i * ld + d] * dob[i * ld + d]).sum();
                }
                let acc = n > 0;
                // dV (+)= P^T dO
                matmul(
                    t,
                    hd,
                    t,
                    dv,
                    v_stride,
                    Mat::t(p, t),
                    Mat::rows(dob, ld),
                    1.0,
                    acc,
                    false,
                );
                // dP = dO V^T
                matmul(
                    t,
                    t,
                    hd,
                    dp,
                    t,
                    Mat::rows(dob, ld),
                    Mat::t(vb, v_stride),
                    1.0,
                    false,
                    false,
                );
                for i in 0..t {
                    for j in 0..t {
                        dp[i * t + j] = p[i * t + j] * (dp[i * t + j] - dsum[i]);
                    }
                }
                let dqh = unsafe {
                    std::slice::from_raw_parts_mut(
                        dqp.at(b * t * q_stride + h * hd),
                        span(q_stride),
                    )
                };
                matmul(
                    t,
                    hd,
                    t,
                    dqh,
                    q_stride,
                    Mat::rows(dp, t),
                    Mat::rows(kb, k_stride),
                    s.scale,
                    false,
                    false,
                );
                let qh = &q[b * t * q_stride + h * hd..];
                matmul(
                    t,
                    hd,
                    t,
                    dk,
                    k_stride,
                    Mat::t(dp, t),
                    Mat::rows(qh, q_stride),
                    s.scale,
                    acc,
                    false,
                );
            }
        },
    );
}

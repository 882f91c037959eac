//! Causal attention `softmax(q k^T * scale + mask) v` without the [B, heads, T, T]
//! probabilities: the forward takes 64 query rows at a time against every key they see
//! (two matrix products and a softmax per row) and keeps only the output and each row's
//! log-sum-exp; the backward recomputes each block's probabilities from q, k and that
//! log-sum-exp. Attention memory is linear in T (the scratch is one [64, T] block per thread).
//!
//! The products go through gemm's microkernels on the calling thread, one task per block: at
//! the README model's head width 32 and T = 128, scalar dot-product loops over key tiles took
//! about 45% of the fused training step.
//!
//! Masking reproduces the composed path (nn/mask.rs) exactly: masked scores get a large
//! negative number, not -inf, so a row that sees no key at all (a left-padded query) has all
//! its scores equal and attends uniformly to every key of the sequence, future ones included.
//! Such a row is computed here with every logit 0, which is the same softmax.
//!
//! Grouped-query attention without copies: query head h reads kv head h / (heads / kv_heads).

use super::dropout::Dropout;
use super::gemm::{matmul, Mat};
use super::{by_dtype, lane_max, lane_sum, use_cpu_kernel, Elem};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;
use std::sync::Mutex;

/// What one call attends over. `window` counts the query itself: key j is visible to query i
/// iff `i - window < j <= i`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlashShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub window: Option<usize>,
    pub scale: f32,
    /// Dropout on the probabilities (training): element (b, h, i, j) of [B, heads, T, T] is
    /// kept by `dropout.keep(((b * heads + h) * T + i) * T + j)`, the composed path's order.
    pub dropout: Option<Dropout>,
}

/// Query rows per block: a block's scores against every key it sees ([BLOCK, T]) are the
/// only per-task scratch, 1 MiB at T = 4096.
const BLOCK: usize = 64;

/// Which keys a query row sees: `[lo, hi)` filtered by the key mask, or every key of the
/// sequence (`all`) when that leaves none.
#[derive(Clone, Copy)]
struct Row {
    lo: usize,
    hi: usize,
    all: bool,
}

/// Per batch row, the visibility of each query, from prefix counts of the key mask.
fn rows(s: &FlashShape, key_mask: Option<&[i64]>) -> Vec<Row> {
    let t = s.seq;
    let mut out = Vec::with_capacity(s.batch * t);
    let mut count = vec![0usize; t + 1];
    for b in 0..s.batch {
        if let Some(km) = key_mask {
            for j in 0..t {
                count[j + 1] = count[j] + (km[b * t + j] != 0) as usize;
            }
        }
        for i in 0..t {
            let lo = s.window.map_or(0, |w| (i + 1).saturating_sub(w));
            let hi = (i + 1).max(lo);
            let seen = match key_mask {
                Some(_) => count[hi] - count[lo],
                None => hi - lo,
            };
            out.push(Row {
                lo,
                hi,
                all: seen == 0,
            });
        }
    }
    out
}

/// The keys a block of query rows needs: the union of their ranges, or the whole sequence
/// when one of them sees no key.
fn key_range(rs: &[Row], seq: usize) -> (usize, usize) {
    if rs.iter().any(|r| r.all) {
        return (0, seq);
    }
    let lo = rs.iter().map(|r| r.lo).min().unwrap_or(0);
    let hi = rs.iter().map(|r| r.hi).max().unwrap_or(0);
    (lo, hi)
}

/// The query blocks of one head, in order: (first row, rows).
fn blocks(seq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq.div_ceil(BLOCK)).map(move |q| (q * BLOCK, BLOCK.min(seq - q * BLOCK)))
}

/// One score row (keys `klo..klo + row.len()`) to probabilities in place: keys `r` does not
/// see become 0. With `lse` given the row is normalised by it (the backward's recomputation);
/// otherwise by its own sum, and its log-sum-exp is returned. A row that sees no key has
/// every logit 0, as the composed path's all-masked row.
fn probabilities<T: Elem>(
    row: &mut [T],
    r: Row,
    km: Option<&[i64]>,
    klo: usize,
    lse: Option<T>,
) -> T {
    let n = row.len();
    if r.all {
        let l = lse.unwrap_or_else(|| T::from(n).unwrap().ln());
        row.fill((-l).exp());
        return l;
    }
    let (a, z) = (r.lo - klo, r.hi - klo);
    row[..a].fill(T::zero());
    row[z..].fill(T::zero());
    let vis = &mut row[a..z];
    if let Some(m) = km {
        for (x, keep) in vis.iter_mut().zip(&m[r.lo..r.hi]) {
            if *keep == 0 {
                *x = T::neg_infinity();
            }
        }
    }
    let shift = lse.unwrap_or_else(|| lane_max(vis));
    // Separate passes: the exp loop vectorizes only without a running sum in it.
    for x in vis.iter_mut() {
        *x = (*x - shift).exp_fast();
    }
    if lse.is_some() {
        return shift;
    }
    let sum = lane_sum(vis);
    let inv = T::one() / sum;
    for x in vis.iter_mut() {
        *x *= inv;
    }
    shift + sum.ln()
}

/// One of q, k, v (or a buffer laid out like one): row r (token b*seq + t) starts at
/// `data[r * stride]`, so each can be a column range of one fused qkv buffer.
#[derive(Clone, Copy)]
pub struct Strided<'a, T> {
    pub data: &'a [T],
    pub stride: usize,
}

impl<'a, T> Strided<'a, T> {
    pub fn new(data: &'a [T], stride: usize) -> Self {
        Strided { data, stride }
    }

    /// The operand of one head: rows `row..` at column `col`.
    fn at(self, row: usize, col: usize) -> Mat<T> {
        Mat::rows(&self.data[row * self.stride + col..], self.stride)
    }

    /// The same rows, transposed.
    fn at_t(self, row: usize, col: usize) -> Mat<T> {
        Mat::t(&self.data[row * self.stride + col..], self.stride)
    }

    /// Its length and row stride, for the bounds checks.
    fn extent(self) -> (usize, usize) {
        (self.data.len(), self.stride)
    }
}

pub(crate) fn forward<T: Elem + 'static>(
    s: &FlashShape,
    scale: T,
    [q, k, v]: [Strided<T>; 3],
    key_mask: Option<&[i64]>,
    out: &mut [T],
    lse: &mut [T],
) {
    let (t, d, h, g) = (s.seq, s.head_dim, s.heads, s.heads / s.kv_heads);
    let vis = rows(s, key_mask);
    let nb = t.div_ceil(BLOCK);
    // One task per (batch, head, query block): P = softmax(scale q k^T) over the keys the
    // block sees, then out = P v, as two products on the calling thread.
    let results: Vec<(Vec<T>, Vec<T>)> = (0..s.batch * h * nb)
        .into_par_iter()
        .map(|task| {
            let (b, hh, qb) = (task / (h * nb), task / nb % h, task % nb);
            let (i0, n) = (qb * BLOCK, BLOCK.min(t - qb * BLOCK));
            let (row0, kc) = (b * t, hh / g * d);
            let km = key_mask.map(|m| &m[row0..][..t]);
            let rs = &vis[row0 + i0..][..n];
            let (klo, khi) = key_range(rs, t);
            let nk = khi - klo;
            let mut p = vec![T::zero(); n * nk];
            let qm = q.at(row0 + i0, hh * d);
            let kt = k.at_t(row0 + klo, kc);
            matmul(n, nk, d, &mut p, nk, qm, kt, scale, false, false);
            let l: Vec<T> = p
                .chunks_mut(nk)
                .zip(rs)
                .map(|(row, r)| probabilities(row, *r, km, klo, None))
                .collect();
            if let Some(d) = s.dropout {
                for (ii, row) in p.chunks_mut(nk).enumerate() {
                    d.apply(row, ((b * h + hh) * t + i0 + ii) * t + klo);
                }
            }
            let mut o = vec![T::zero(); n * d];
            let vm = v.at(row0 + klo, kc);
            matmul(
                n,
                d,
                nk,
                &mut o,
                d,
                Mat::rows(&p, nk),
                vm,
                T::one(),
                false,
                false,
            );
            (o, l)
        })
        .collect();
    for (task, (o, l)) in results.into_iter().enumerate() {
        let (b, hh, qb) = (task / (h * nb), task / nb % h, task % nb);
        let i0 = qb * BLOCK;
        for (ii, orow) in o.chunks(d).enumerate() {
            out[(b * t + i0 + ii) * h * d + hh * d..][..d].copy_from_slice(orow);
        }
        lse[(b * h + hh) * t + i0..][..l.len()].copy_from_slice(&l);
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Elem + 'static>(
    s: &FlashShape,
    scale: T,
    [q, k, v]: [Strided<T>; 3],
    key_mask: Option<&[i64]>,
    out: &[T],
    lse: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let (t, d, h, kvh, g) = (s.seq, s.head_dim, s.heads, s.kv_heads, s.heads / s.kv_heads);
    let vis = rows(s, key_mask);
    let od = h * d;
    // D_i = dout_i . out_i, per (batch, head, row) in lse order.
    let delta: Vec<T> = (0..s.batch * h * t)
        .into_par_iter()
        .map(|r| {
            let (b, hh, i) = (r / (h * t), r / t % h, r % t);
            let at = (b * t + i) * od + hh * d;
            (0..d).fold(T::zero(), |z, dd| dout[at + dd].mul_add(out[at + dd], z))
        })
        .collect();
    // One task per (batch, kv head): it alone accumulates that kv head's dk, dv and its query
    // heads' dq, in a fixed order, so the result does not depend on the thread count. Per
    // query block, with P recomputed from the saved log-sum-exp:
    //   dP = dout v^T, dS = P * (dP - D) * scale, dq = dS k, dk += dS^T q, dv += P^T dout.
    let results: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..s.batch * kvh)
        .into_par_iter()
        .map(|task| {
            let (b, kh) = (task / kvh, task % kvh);
            let (row0, kc) = (b * t, kh * d);
            let km = key_mask.map(|m| &m[row0..][..t]);
            let mut gq = vec![T::zero(); g * t * d];
            let (mut gk, mut gv) = (vec![T::zero(); t * d], vec![T::zero(); t * d]);
            let mut p = vec![T::zero(); BLOCK.min(t) * t];
            let mut ds = p.clone();
            for gi in 0..g {
                let hh = kh * g + gi;
                for (i0, n) in blocks(t) {
                    let rs = &vis[row0 + i0..][..n];
                    let (klo, khi) = key_range(rs, t);
                    let nk = khi - klo;
                    let (p, ds) = (&mut p[..n * nk], &mut ds[..n * nk]);
                    let qm = q.at(row0 + i0, hh * d);
                    let dom = Strided::new(dout, od).at(row0 + i0, hh * d);
                    let li = (b * h + hh) * t + i0;
                    matmul(
                        n,
                        nk,
                        d,
                        p,
                        nk,
                        qm,
                        k.at_t(row0 + klo, kc),
                        scale,
                        false,
                        false,
                    );
                    for (ii, (row, r)) in p.chunks_mut(nk).zip(rs).enumerate() {
                        probabilities(row, *r, km, klo, Some(lse[li + ii]));
                    }
                    let vt = v.at_t(row0 + klo, kc);
                    matmul(n, nk, d, ds, nk, dom, vt, T::one(), false, false);
                    for (ii, (dsr, pr)) in ds.chunks_mut(nk).zip(p.chunks_mut(nk)).enumerate() {
                        let di = delta[li + ii];
                        match s.dropout {
                            None => {
                                for (x, pj) in dsr.iter_mut().zip(pr) {
                                    *x = *pj * (*x - di) * scale;
                                }
                            }
                            // The forward multiplied v by P Z (Z the mask, 0 or 1 / (1 - p)):
                            // dP = Z dP~, dS = P (dP - D) with D = dout . out as before, and
                            // P becomes P Z for dv.
                            Some(d) => {
                                let (base, keep) =
                                    (((li + ii) * t + klo) as u64, T::from(d.scale()).unwrap());
                                for (j, (x, pj)) in dsr.iter_mut().zip(pr).enumerate() {
                                    let z = if d.keep(base + j as u64) {
                                        keep
                                    } else {
                                        T::zero()
                                    };
                                    *x = *pj * (*x * z - di) * scale;
                                    *pj *= z;
                                }
                            }
                        }
                    }
                    let km_ = k.at(row0 + klo, kc);
                    let gqb = &mut gq[(gi * t + i0) * d..];
                    matmul(
                        n,
                        d,
                        nk,
                        gqb,
                        d,
                        Mat::rows(ds, nk),
                        km_,
                        T::one(),
                        false,
                        false,
                    );
                    let (gkb, gvb) = (&mut gk[klo * d..], &mut gv[klo * d..]);
                    matmul(nk, d, n, gkb, d, Mat::t(ds, nk), qm, T::one(), true, false);
                    matmul(nk, d, n, gvb, d, Mat::t(p, nk), dom, T::one(), true, false);
                }
            }
            (gq, gk, gv)
        })
        .collect();
    for (task, (gq, gk, gv)) in results.into_iter().enumerate() {
        let (b, kh) = (task / kvh, task % kvh);
        for gi in 0..g {
            let hh = kh * g + gi;
            for i in 0..t {
                dq[(b * t + i) * q.stride + hh * d..][..d]
                    .copy_from_slice(&gq[(gi * t + i) * d..][..d]);
            }
        }
        for j in 0..t {
            dk[(b * t + j) * k.stride + kh * d..][..d].copy_from_slice(&gk[j * d..][..d]);
            dv[(b * t + j) * v.stride + kh * d..][..d].copy_from_slice(&gv[j * d..][..d]);
        }
    }
}

/// Panics unless buffers of these (length, row stride) hold q, k, v (or their gradients).
fn check(s: &FlashShape, qkv: [(usize, usize); 3], key_mask: Option<&[i64]>) {
    let rows = s.batch * s.seq;
    assert!(
        s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
        "heads must be a multiple of kv_heads"
    );
    let (hd, kd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    for ((len, stride), width) in qkv.into_iter().zip([hd, kd, kd]) {
        assert!(
            stride >= width,
            "row stride {stride} shorter than its {width} columns"
        );
        assert!(
            rows == 0 || len >= (rows - 1) * stride + width,
            "input too short"
        );
    }
    if let Some(m) = key_mask {
        assert_eq!(m.len(), rows, "key_mask must hold batch x seq entries");
    }
}

/// Panics unless the output and log-sum-exp buffers have these lengths' shapes.
fn check_out(s: &FlashShape, out: usize, lse: usize) {
    assert_eq!(
        out,
        s.batch * s.seq * s.heads * s.head_dim,
        "out must be [batch*seq, heads*head_dim]"
    );
    assert_eq!(
        lse,
        s.batch * s.heads * s.seq,
        "lse must be [batch*heads*seq]"
    );
}

/// q: element (b, t, h, d) at `q.data[(b*seq + t)*q.stride + h*head_dim + d]`; k, v likewise
/// with kv_heads (so q/k/v can be column ranges of one fused qkv buffer).
/// key_mask: optional [batch*seq], 1 = token, 0 = padding. out: [batch*seq, heads*head_dim]
/// contiguous; lse: [batch*heads*seq], each row's log-sum-exp, kept for the backward.
pub fn flash_forward(
    s: &FlashShape,
    qkv: [Strided<f32>; 3],
    key_mask: Option<&[i64]>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    check(s, qkv.map(Strided::extent), key_mask);
    check_out(s, out.len(), lse.len());
    forward(s, s.scale, qkv, key_mask, out, lse)
}

/// Recomputes the probabilities block by block from q, k and lse; writes (overwrites) dq, dk, dv
/// in the same layouts and strides as q, k, v.
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    s: &FlashShape,
    qkv: [Strided<f32>; 3],
    key_mask: Option<&[i64]>,
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    check(s, qkv.map(Strided::extent), key_mask);
    let [qs, ks, vs] = qkv.map(|x| x.stride);
    check(s, [(dq.len(), qs), (dk.len(), ks), (dv.len(), vs)], None);
    check_out(s, out.len(), lse.len());
    assert_eq!(dout.len(), out.len(), "dout must be shaped like out");
    backward(s, s.scale, qkv, key_mask, out, lse, dout, dq, dk, dv)
}

/// The candle op: q [B, T, H, D], k and v [B, T, KV, D], each with rows of any stride.
struct FlashAttention {
    window: Option<usize>,
    key_mask: Option<Vec<i64>>,
    scale: f64,
    /// The forward's log-sum-exp, for the backward.
    lse: Mutex<Option<CpuStorage>>,
}

/// A [B, T, n, D] layout whose rows (b, t) are evenly strided: its offset and row stride.
fn row_strided(l: &Layout) -> Option<(usize, usize)> {
    let (b, t, n, d) = l.shape().dims4().ok()?;
    let st = l.stride();
    let rs = st[1];
    let ok = (d <= 1 || st[3] == 1) && (n <= 1 || st[2] == d) && (b <= 1 || st[0] == t * rs);
    ok.then_some((l.start_offset(), if t > 1 || b > 1 { rs } else { n * d }))
}

impl FlashAttention {
    fn shape(&self, q: &Shape, k: &Shape) -> Result<FlashShape> {
        let (batch, seq, heads, head_dim) = q.dims4()?;
        Ok(FlashShape {
            batch,
            seq,
            heads,
            kv_heads: k.dims4()?.2,
            head_dim,
            window: self.window,
            scale: self.scale as f32,
            dropout: None,
        })
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let fs = self.shape(ql.shape(), kl.shape())?;
        let (Some((qo, qr)), Some((ko, kr)), Some((vo, vr))) =
            (row_strided(ql), row_strided(kl), row_strided(vl))
        else {
            candle_core::bail!("flash-attention: q, k and v need rows of one stride")
        };
        let n_out = fs.batch * fs.seq * fs.heads * fs.head_dim;
        let n_lse = fs.batch * fs.heads * fs.seq;
        let km = self.key_mask.as_deref();
        macro_rules! run {
            ($t:ty, $q:expr, $k:expr, $v:expr, $wrap:path) => {{
                let (mut out, mut lse) =
                    (vec![<$t>::default(); n_out], vec![<$t>::default(); n_lse]);
                let qkv = [
                    Strided::new(&$q[qo..], qr),
                    Strided::new(&$k[ko..], kr),
                    Strided::new(&$v[vo..], vr),
                ];
                forward::<$t>(&fs, self.scale as $t, qkv, km, &mut out, &mut lse);
                *self.lse.lock().unwrap() = Some($wrap(lse));
                $wrap(out)
            }};
        }
        let out = match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                run!(f32, q, k, v, CpuStorage::F32)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                run!(f64, q, k, v, CpuStorage::F64)
            }
            _ => candle_core::bail!("flash-attention: q, k, v must all be f32 or all f64"),
        };
        Ok((out, ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let fs = self.shape(q.shape(), k.shape())?;
        let lse = self.lse.lock().unwrap().clone();
        let Some(lse) = lse else {
            candle_core::bail!("flash-attention: backward without a forward")
        };
        let (q, k, v, g) = (
            q.contiguous()?,
            k.contiguous()?,
            v.contiguous()?,
            g.contiguous()?,
        );
        let (qr, kr) = (fs.heads * fs.head_dim, fs.kv_heads * fs.head_dim);
        let km = self.key_mask.as_deref();
        let grads = by_dtype!(q.dtype(), "flash-attention", |T| {
            super::with_slices::<T, _>(&[&q, &k, &v, out, &g], |s| {
                let lse = lse.as_slice::<T>()?;
                let (mut dq, mut dk, mut dv) = (
                    vec![<T as Zero>::zero(); s[0].len()],
                    vec![<T as Zero>::zero(); s[1].len()],
                    vec![<T as Zero>::zero(); s[2].len()],
                );
                let qkv = [
                    Strided::new(s[0], qr),
                    Strided::new(s[1], kr),
                    Strided::new(s[2], kr),
                ];
                backward::<T>(
                    &fs,
                    num_traits::cast(self.scale).unwrap(),
                    qkv,
                    km,
                    s[3],
                    lse,
                    s[4],
                    &mut dq,
                    &mut dk,
                    &mut dv,
                );
                Ok((
                    super::cpu_tensor(dq, q.shape())?,
                    super::cpu_tensor(dk, k.shape())?,
                    super::cpu_tensor(dv, v.shape())?,
                ))
            })?
        });
        Ok((Some(grads.0), Some(grads.1), Some(grads.2)))
    }
}

/// Causal attention for q [B, T, H, D] and k, v [B, T, KV, D] (H a multiple of KV): [B, T, H, D].
/// `window` counts the query itself; `key_mask` is [B*T], 1 = token, 0 = padding. On the CPU in
/// f32/f64 the probabilities are never stored; elsewhere this is the composed expression.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    key_mask: Option<&[i64]>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let (kb, kt, kvh, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() || kvh == 0 || h % kvh != 0 {
        candle_core::bail!(
            "flash-attention: q {:?}, k {:?}, v {:?} do not match: expected k and v [{b}, {t}, kv_heads, {d}] with kv_heads dividing {h}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(m) = key_mask {
        if m.len() != b * t {
            candle_core::bail!(
                "flash-attention: key_mask has {} entries, expected batch x seq = {}",
                m.len(),
                b * t
            );
        }
    }
    if use_cpu_kernel(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        let strided = |x: &Tensor| -> Result<Tensor> {
            let ok = row_strided(x.layout()).is_some();
            if ok {
                Ok(x.clone())
            } else {
                x.contiguous()
            }
        };
        let op = FlashAttention {
            window,
            key_mask: key_mask.map(<[i64]>::to_vec),
            scale,
            lse: Mutex::new(None),
        };
        return strided(q)?.apply_op3(&strided(k)?, &strided(v)?, op);
    }
    composed(q, k, v, window, key_mask, scale)
}

/// The same attention through the dense additive mask: the reference the kernel reproduces.
/// It takes `flash_attention`'s arguments one for one so that either can stand in for the other.
pub fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
    key_mask: Option<&[i64]>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = q.dims4()?;
    let kvh = k.dim(2)?;
    let mask = crate::nn::mask::attention_mask(b, t, 0, window, key_mask, q.dtype(), q.device())?;
    let qh = q
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, kvh, h / kvh * t, d))?;
    let kh = k.transpose(1, 2)?.contiguous()?;
    let vh = v.transpose(1, 2)?.contiguous()?;
    super::attention_probs(&qh, &kh, h / kvh, scale, &mask)?
        .matmul(&vh)?
        .reshape((b, h, t, d))?
        .transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grads, max_abs_diff};
    use crate::testing::rand_tensor;
    use candle_core::{DType, Device, Var, D};

    /// softmax(q k^T * scale + mask) v per query head with k, v repeated, through candle's
    /// own ops and autograd.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        key_mask: Option<&[i64]>,
        scale: f64,
    ) -> Tensor {
        let (b, t, h, d) = q.dims4().unwrap();
        let g = h / k.dim(2).unwrap();
        let mask =
            crate::nn::mask::attention_mask(b, t, 0, window, key_mask, q.dtype(), &Device::Cpu)
                .unwrap();
        let heads: Vec<Tensor> = (0..h)
            .map(|hh| {
                let qh = q.narrow(2, hh, 1).unwrap().squeeze(2).unwrap();
                let kh = k.narrow(2, hh / g, 1).unwrap().squeeze(2).unwrap();
                let vh = v.narrow(2, hh / g, 1).unwrap().squeeze(2).unwrap();
                let s = (qh.matmul(&kh.t().unwrap()).unwrap() * scale).unwrap();
                let s = s.broadcast_add(&mask.squeeze(1).unwrap()).unwrap();
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                p.matmul(&vh).unwrap().unsqueeze(2).unwrap()
            })
            .collect();
        let _ = d;
        Tensor::cat(&heads, 2).unwrap()
    }

    struct Case {
        b: usize,
        t: usize,
        h: usize,
        kv: usize,
        d: usize,
        window: Option<usize>,
        key_mask: Option<Vec<i64>>,
    }

    /// Output and every input gradient of `sum(y * w)` against the reference, in f64.
    fn matches_reference(c: &Case, tol: f64) {
        let q = Var::from_tensor(&rand_tensor(&[c.b, c.t, c.h, c.d], 1)).unwrap();
        let k = Var::from_tensor(&rand_tensor(&[c.b, c.t, c.kv, c.d], 2)).unwrap();
        let v = Var::from_tensor(&rand_tensor(&[c.b, c.t, c.kv, c.d], 3)).unwrap();
        let scale = 1.7 / (c.d as f64).sqrt();
        let km = c.key_mask.as_deref();
        let ours = flash_attention(&q, &k, &v, c.window, km, scale).unwrap();
        let theirs = reference(&q, &k, &v, c.window, km, scale);
        let e = max_abs_diff(&ours, &theirs);
        assert!(e < tol, "output differs by {e}");
        let w = rand_tensor(ours.dims(), 4);
        let go = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (theirs * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let e = max_abs_diff(go.get(x).unwrap(), gt.get(x).unwrap());
            assert!(e < tol, "d{name} differs by {e}");
        }
    }

    fn case(b: usize, t: usize, h: usize, kv: usize) -> Case {
        Case {
            b,
            t,
            h,
            kv,
            d: 5,
            window: None,
            key_mask: None,
        }
    }

    #[test]
    fn multi_head_over_several_tiles() {
        // 150 = two full key tiles and a partial one.
        matches_reference(&case(1, 150, 2, 2), 1e-10);
    }

    #[test]
    fn grouped_query_heads_batch_of_two() {
        matches_reference(&case(2, 70, 6, 2), 1e-10);
        matches_reference(&case(2, 9, 3, 1), 1e-10);
    }

    #[test]
    fn sliding_window() {
        for w in [1, 3, 64, 65, 100] {
            let c = Case {
                window: Some(w),
                ..case(2, 140, 4, 2)
            };
            matches_reference(&c, 1e-10);
        }
    }

    /// Left padding leaves the first queries of a row with no visible key: the composed
    /// softmax then attends uniformly over the whole row, future keys included.
    #[test]
    fn padding_including_rows_that_see_no_key() {
        let t = 80;
        let mut km = vec![1i64; 2 * t];
        km[..5].fill(0); // left padding in batch row 0
        km[t + 30..t + 40].fill(0); // a hole in batch row 1
        km[2 * t - 3..].fill(0); // right padding in batch row 1
        matches_reference(
            &Case {
                key_mask: Some(km.clone()),
                ..case(2, t, 4, 2)
            },
            1e-10,
        );
        // With a window the hole in row 1 blinds queries 30..40 too.
        matches_reference(
            &Case {
                key_mask: Some(km),
                window: Some(4),
                ..case(2, t, 4, 2)
            },
            1e-10,
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut km = vec![1i64; 2 * 7];
        // Holes only: a row that sees no key is constant in its scores (finite differences
        // see 0 where the composed autograd, checked above, gives its formal gradient).
        km[3] = 0;
        km[9] = 0;
        let inputs = [
            rand_tensor(&[2, 7, 4, 3], 11),
            rand_tensor(&[2, 7, 2, 3], 12),
            rand_tensor(&[2, 7, 2, 3], 13),
        ];
        check_grads(
            &inputs,
            |a| flash_attention(&a[0], &a[1], &a[2], Some(3), Some(&km), 0.8),
            1e-6,
        );
    }

    /// The raw f32 entry points on q, k, v as column ranges of one fused qkv buffer, against
    /// the reference in f64: 1e-5 of the output's and each gradient's scale.
    #[test]
    fn fused_qkv_strides_in_f32() {
        let (b, t, h, kv, d) = (2, 100, 4, 2, 8);
        let width = (h + 2 * kv) * d;
        let qkv = rand_tensor(&[b * t, width], 21);
        let dout = rand_tensor(&[b, t, h, d], 22);
        let mut km = vec![1i64; b * t];
        km[..3].fill(0);
        let s = FlashShape {
            batch: b,
            seq: t,
            heads: h,
            kv_heads: kv,
            head_dim: d,
            window: Some(40),
            scale: 0.35,
            dropout: None,
        };
        let f32s = |x: &Tensor| -> Vec<f32> {
            let x = x.to_dtype(DType::F32).unwrap();
            x.flatten_all().unwrap().to_vec1().unwrap()
        };
        let (buf, go) = (f32s(&qkv), f32s(&dout));
        let (qo, ko, vo) = (0, h * d, (h + kv) * d);
        let mut out = vec![0f32; b * t * h * d];
        let mut lse = vec![0f32; b * h * t];
        let parts = [qo, ko, vo].map(|o| Strided::new(&buf[o..], width));
        flash_forward(&s, parts, Some(&km), &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; buf.len() - qo],
            vec![0f32; buf.len() - ko],
            vec![0f32; buf.len() - vo],
        );
        flash_backward(
            &s,
            parts,
            Some(&km),
            &out,
            &lse,
            &go,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let x = Var::from_tensor(&qkv.reshape((b, t, width)).unwrap()).unwrap();
        let part = |o: usize, n: usize| {
            x.narrow(2, o, n * d)
                .unwrap()
                .reshape((b, t, n, d))
                .unwrap()
        };
        let r = reference(
            &part(qo, h),
            &part(ko, kv),
            &part(vo, kv),
            s.window,
            Some(&km),
            0.35f32 as f64,
        );
        let grads = (&r * &dout).unwrap().sum_all().unwrap().backward().unwrap();
        let gx: Vec<f64> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rv: Vec<f64> = r.flatten_all().unwrap().to_vec1().unwrap();
        let rel = |ours: &[f32], theirs: &[f64]| {
            let scale = theirs.iter().fold(0f64, |m, x| m.max(x.abs()));
            let err = ours
                .iter()
                .zip(theirs)
                .fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            err / scale
        };
        assert!(rel(&out, &rv) < 1e-5, "out {}", rel(&out, &rv));
        for (name, g, o, n) in [("q", &dq, qo, h), ("k", &dk, ko, kv), ("v", &dv, vo, kv)] {
            let (mut ours, mut theirs) = (vec![], vec![]);
            for row in 0..b * t {
                for c in 0..n * d {
                    ours.push(g[row * width + c]);
                    theirs.push(gx[row * width + o + c]);
                }
            }
            assert!(
                rel(&ours, &theirs) < 1e-5,
                "d{name} {}",
                rel(&ours, &theirs)
            );
        }
        // The columns of the other two parts are left alone.
        assert!(dq[h * d..width].iter().all(|x| *x == 0.0));
    }

    /// Splitting the work over more threads changes nothing, bit for bit.
    #[test]
    fn independent_of_the_thread_count() {
        let q = rand_tensor(&[2, 130, 4, 8], 31)
            .to_dtype(DType::F32)
            .unwrap();
        let k = rand_tensor(&[2, 130, 2, 8], 32)
            .to_dtype(DType::F32)
            .unwrap();
        let v = rand_tensor(&[2, 130, 2, 8], 33)
            .to_dtype(DType::F32)
            .unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let vars: Vec<Var> = [&q, &k, &v]
                    .iter()
                    .map(|t| Var::from_tensor(t).unwrap())
                    .collect();
                let y = flash_attention(&vars[0], &vars[1], &vars[2], None, None, 0.3).unwrap();
                let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
                let mut all: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                for x in &vars {
                    all.extend(
                        g.get(x)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    );
                }
                all
            })
        };
        assert_eq!(run(1), run(3));
    }
}

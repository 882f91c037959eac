//! Raw-slice kernels of the fused training path: matmuls with strides (so a transpose is a
//! stride and a column range of a fused buffer is an operand), and the row-wise and
//! elementwise work of a block, each forward beside its backward. Everything writes into
//! buffers it is given; nothing allocates per call except small per-thread partial sums.

use crate::ops::activation::{derivative as gelu_grad, value as gelu};
pub(crate) use crate::ops::gemm::{matmul, Mat};
use crate::ops::swiglu::sigmoid;
use crate::spec::Activation;
use rayon::prelude::*;

/// Rows below which threading costs more than it saves.
const PAR_ROWS: usize = 64;

/// `y[N, out] = x[N, in] W[out, in]^T (+ bias)`, y with leading dimension `ldy`.
#[allow(clippy::too_many_arguments)]
pub fn linear_fwd(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    inp: usize,
    out: usize,
    y: &mut [f32],
    ldy: usize,
) {
    if let Some(b) = bias {
        for_rows(y, ldy, rows, |_, r| r[..out].copy_from_slice(b));
    }
    let (xm, wt) = (Mat::rows(x, inp), Mat::t(w, inp));
    matmul(rows, out, inp, y, ldy, xm, wt, 1.0, bias.is_some(), true);
}

/// The backward of `linear_fwd` for an upstream gradient dy [N, out] (leading dimension ldy):
/// `dW += dy^T x`, `db += colsum(dy)`, and `dx (+)= dy W` when dx is given.
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    ldy: usize,
    rows: usize,
    inp: usize,
    out: usize,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dx: Option<(&mut [f32], bool)>,
) {
    if let Some(dw) = dw {
        let (dyt, xm) = (Mat::t(dy, ldy), Mat::rows(x, inp));
        matmul(out, inp, rows, dw, inp, dyt, xm, 1.0, true, true);
    }
    if let Some(db) = db {
        col_sum_acc(dy, ldy, rows, out, db);
    }
    if let Some((dx, acc)) = dx {
        let (dym, wm) = (Mat::rows(dy, ldy), Mat::rows(w, inp));
        matmul(rows, inp, out, dx, inp, dym, wm, 1.0, acc, true);
    }
}

/// A LoRA branch added to a linear's output: `h = x A^T` [N, r] (kept for the backward),
/// `y += s h B^T`. `b` holds the rows of B for the `out` outputs in `y`.
#[allow(clippy::too_many_arguments)]
pub fn lora_fwd(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    rows: usize,
    inp: usize,
    out: usize,
    h: &mut [f32],
    y: &mut [f32],
    ldy: usize,
) {
    let r = a.len() / inp;
    linear_fwd(x, a, None, rows, inp, r, h, r);
    let (hm, bt) = (Mat::rows(h, r), Mat::t(b, r));
    matmul(rows, out, r, y, ldy, hm, bt, s, true, true);
}

/// Its backward for an upstream dy [N, out]: `dB += s dy^T h`, `dh = s dy B` (into the
/// scratch `dh`), then h = x A^T's own linear backward: `dA += dh^T x`, `dx += dh A`.
#[allow(clippy::too_many_arguments)]
pub fn lora_bwd(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    s: f32,
    h: &[f32],
    dy: &[f32],
    ldy: usize,
    rows: usize,
    inp: usize,
    out: usize,
    grads: (Option<&mut [f32]>, Option<&mut [f32]>),
    dh: &mut [f32],
    dx: &mut [f32],
) {
    let r = a.len() / inp;
    let (da, db) = grads;
    if let Some(db) = db {
        let (dyt, hm) = (Mat::t(dy, ldy), Mat::rows(h, r));
        matmul(out, r, rows, db, r, dyt, hm, s, true, true);
    }
    let (dym, bm) = (Mat::rows(dy, ldy), Mat::rows(b, r));
    matmul(rows, r, out, dh, r, dym, bm, s, false, true);
    linear_bwd(x, a, dh, r, rows, inp, r, da, None, Some((dx, true)));
}

/// Applies `f(row_index, row)` to the first `rows` rows (leading dimension `ld`) of `buf`.
pub fn for_rows(buf: &mut [f32], ld: usize, rows: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let buf = &mut buf[..rows * ld];
    if rows >= PAR_ROWS {
        buf.par_chunks_mut(ld)
            .enumerate()
            .for_each(|(i, r)| f(i, r));
    } else {
        buf.chunks_mut(ld).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Fixed row blocks for reductions over rows: the same blocks whatever the thread count, and
/// the partial sums added in block order, so a reduction always gives the same bits.
const REDUCE_ROWS: usize = 256;

/// `acc[j] += sum_i f(i)[j]` for i < rows, where `f(i, out)` adds row i's terms into `out`.
pub fn row_reduce_acc(
    rows: usize,
    width: usize,
    acc: &mut [f32],
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    let blocks = rows.div_ceil(REDUCE_ROWS);
    let partial: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|bi| {
            let mut p = vec![0f32; width];
            for i in bi * REDUCE_ROWS..((bi + 1) * REDUCE_ROWS).min(rows) {
                f(i, &mut p);
            }
            p
        })
        .collect();
    for p in partial {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// `acc[j] += sum_i m[i, j]` over `rows` rows of width `width` (leading dimension ld).
pub fn col_sum_acc(m: &[f32], ld: usize, rows: usize, width: usize, acc: &mut [f32]) {
    row_reduce_acc(rows, width, acc, |i, p| {
        for (pj, v) in p.iter_mut().zip(&m[i * ld..i * ld + width]) {
            *pj += *v;
        }
    });
}

/// RMSNorm or LayerNorm over rows of width d. `mean` is None for RMSNorm.
pub struct NormParams<'a> {
    pub w: &'a [f32],
    pub b: Option<&'a [f32]>,
    pub eps: f32,
    pub layer_norm: bool,
}

/// y = w * (x - mean) * rstd + b (LayerNorm) or w * (x * rstd) (RMSNorm), keeping mean and rstd
/// per row for the backward.
pub fn norm_fwd(p: &NormParams, x: &[f32], y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
    let d = p.w.len();
    let rows = x.len() / d;
    let stats: Vec<(f32, f32)> = (0..rows)
        .into_par_iter()
        .with_min_len(PAR_ROWS)
        .map(|i| row_stats(p, &x[i * d..(i + 1) * d]))
        .collect();
    for (i, (m, r)) in stats.iter().enumerate() {
        mean[i] = *m;
        rstd[i] = *r;
    }
    for_rows(y, d, rows, |i, o| {
        let xr = &x[i * d..(i + 1) * d];
        let (m, r) = stats[i];
        if p.layer_norm {
            for j in 0..d {
                o[j] = (xr[j] - m) * r * p.w[j] + p.b.map_or(0.0, |b| b[j]);
            }
        } else {
            for j in 0..d {
                o[j] = p.w[j] * (xr[j] * r);
            }
        }
    });
}

fn row_stats(p: &NormParams, xr: &[f32]) -> (f32, f32) {
    let n = xr.len() as f32;
    if p.layer_norm {
        let mean = xr.iter().copied().sum::<f32>() / n;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        (mean, 1.0 / (var + p.eps).sqrt())
    } else {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / n;
        (0.0, 1.0 / (ms + p.eps).sqrt())
    }
}

/// With xhat = (x - mean) * rstd and gw = g * w:
/// LayerNorm: dx = rstd (gw - mean(gw) - xhat mean(gw xhat)); RMSNorm: dx = rstd (gw - xhat
/// mean(gw xhat)); dw += sum_rows g xhat; db += sum_rows g. dx is added to `dx_acc`.
#[allow(clippy::too_many_arguments)]
pub fn norm_bwd(
    p: &NormParams,
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    g: &[f32],
    dx_acc: &mut [f32],
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
) {
    let d = p.w.len();
    let rows = x.len() / d;
    let inv_d = 1.0 / d as f32;
    for_rows(dx_acc, d, rows, |i, o| {
        let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
        let (m, r) = (mean[i], rstd[i]);
        let (mut m1, mut m2) = (0f32, 0f32);
        for j in 0..d {
            let gw = gr[j] * p.w[j];
            m1 += gw;
            m2 += gw * (xr[j] - m) * r;
        }
        let (m1, m2) = (if p.layer_norm { m1 * inv_d } else { 0.0 }, m2 * inv_d);
        for j in 0..d {
            o[j] += r * (gr[j] * p.w[j] - m1 - (xr[j] - m) * r * m2);
        }
    });
    if let Some(dw) = dw {
        row_reduce_acc(rows, d, dw, |i, acc| {
            let (xr, gr) = (&x[i * d..(i + 1) * d], &g[i * d..(i + 1) * d]);
            let (m, r) = (mean[i], rstd[i]);
            for j in 0..d {
                acc[j] += gr[j] * ((xr[j] - m) * r);
            }
        });
    }
    if let Some(db) = db {
        col_sum_acc(g, d, rows, d, db);
    }
}

/// Rotate-half RoPE in place on `heads` heads of width hd starting at column `col` of each row
/// of `buf` (leading dimension ld); row i uses position `i % seq` of the tables [seq, hd/2].
/// `inverse` rotates back: the backward of the rotation is its inverse.
#[allow(clippy::too_many_arguments)]
pub fn rope_in_place(
    buf: &mut [f32],
    ld: usize,
    rows: usize,
    col: usize,
    heads: usize,
    hd: usize,
    seq: usize,
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = hd / 2;
    for_rows(buf, ld, rows, |i, r| {
        let t = i % seq;
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for h in 0..heads {
            let x = &mut r[col + h * hd..col + (h + 1) * hd];
            for j in 0..half {
                let (x1, x2) = (x[j], x[j + half]);
                let sn = if inverse { -s[j] } else { s[j] };
                x[j] = x1 * c[j] + (-x2) * sn;
                x[j + half] = x2 * c[j] + x1 * sn;
            }
        }
    });
}

/// Elements per parallel chunk of the elementwise kernels.
const CHUNK: usize = 4096;

/// `act(x)` and `act'(x)` together: SiLU's share one sigmoid. Each activation is its own
/// instantiation of the loops below, so a loop holds no match and vectorizes.
fn with_activation<R>(a: Activation, f: impl ActFn<R>) -> R {
    match a {
        Activation::Silu => f.run(|x| {
            let s = sigmoid(x);
            (x * s, s * (1.0 + x * (1.0 - s)))
        }),
        Activation::Relu => f.run(|x| if x > 0.0 { (x, 1.0) } else { (0.0, 0.0) }),
        Activation::GeluTanh => f.run(|x| (gelu(x, true), gelu_grad(x, true))),
        Activation::Gelu => f.run(|x| (gelu(x, false), gelu_grad(x, false))),
    }
}

/// A loop generic over the activation (a closure type per activation).
trait ActFn<R> {
    fn run(self, act: impl Fn(f32) -> (f32, f32) + Sync) -> R;
}

/// h = act(g) * u (gated) or h = act(u) (plain, `gate` None).
pub fn mlp_act_fwd(a: Activation, gate: Option<&[f32]>, up: &[f32], h: &mut [f32]) {
    struct Fwd<'a>(Option<&'a [f32]>, &'a [f32], &'a mut [f32]);
    impl ActFn<()> for Fwd<'_> {
        fn run(self, act: impl Fn(f32) -> (f32, f32) + Sync) {
            let Fwd(gate, up, h) = self;
            let n = up.len();
            h[..n]
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(bi, o)| {
                    let u = &up[bi * CHUNK..][..o.len()];
                    match gate {
                        Some(g) => {
                            let g = &g[bi * CHUNK..][..o.len()];
                            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                                *o = act(*g).0 * *u;
                            }
                        }
                        None => {
                            for (o, u) in o.iter_mut().zip(u) {
                                *o = act(*u).0;
                            }
                        }
                    }
                });
        }
    }
    with_activation(a, Fwd(gate, up, h))
}

/// Gated: dg = dh * u * act'(g), du = dh * act(g); plain: du = dh * act'(u) (`dg` unused).
pub fn mlp_act_bwd(
    a: Activation,
    gate: Option<&[f32]>,
    up: &[f32],
    dh: &[f32],
    dg: &mut [f32],
    du: &mut [f32],
) {
    struct Bwd<'a>(
        Option<&'a [f32]>,
        &'a [f32],
        &'a [f32],
        &'a mut [f32],
        &'a mut [f32],
    );
    impl ActFn<()> for Bwd<'_> {
        fn run(self, act: impl Fn(f32) -> (f32, f32) + Sync) {
            let Bwd(gate, up, dh, dg, du) = self;
            let n = up.len();
            let (dg, du) = (&mut dg[..n], &mut du[..n]);
            match gate {
                Some(g) => dg
                    .par_chunks_mut(CHUNK)
                    .zip(du.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(bi, (og, ou))| {
                        let r = bi * CHUNK..bi * CHUNK + og.len();
                        let (g, u, d) = (&g[r.clone()], &up[r.clone()], &dh[r]);
                        for i in 0..og.len() {
                            let (v, dv) = act(g[i]);
                            og[i] = d[i] * u[i] * dv;
                            ou[i] = d[i] * v;
                        }
                    }),
                None => du.par_chunks_mut(CHUNK).enumerate().for_each(|(bi, ou)| {
                    let r = bi * CHUNK..bi * CHUNK + ou.len();
                    let (u, d) = (&up[r.clone()], &dh[r]);
                    for i in 0..ou.len() {
                        ou[i] = d[i] * act(u[i]).1;
                    }
                }),
            }
        }
    }
    with_activation(a, Bwd(gate, up, dh, dg, du))
}

/// `acc += x` elementwise, on all threads.
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b));
}

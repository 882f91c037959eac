//! Each custom kernel against the composed candle expression it replaces, forward alone and
//! forward + backward, at the shapes of a Qwen2.5-0.5B step on 256 tokens, and the quantized
//! decoding and prefill products against candle's quantized matmul. Run with `cargo bench -p
//! metalcandle-core` (`-- quantized` for the quantized products alone); times are
//! medians, the ratio is candle's / ours.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use metalcandle_core::nn::{QuantizedMatrix, Weight};
use metalcandle_core::ops;
use metalcandle_core::rng::Rng;
use std::sync::Arc;
use std::time::Instant;

fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[runs / 2])
}

/// Seeded values, uniform in [-1, 1).
fn uniform(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| 2.0 * rng.uniform() as f32 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Forward, and forward + backward of `sum(y * w)` with every input a variable. The
/// backward of `sum(y * w)` itself (candle multiplies a broadcast gradient, ~25 ms for a
/// [14, 256, 256] output) is timed on its own and taken off both sides, so that the ratio is
/// the kernels'.
fn case(
    name: &str,
    inputs: &[Tensor],
    ours: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let runs = 7;
    let vars: Vec<Tensor> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).map(|v| v.as_tensor().clone()))
        .collect::<Result<_>>()?;
    let y = ours(inputs)?;
    let w = uniform(y.dims(), 9)?;
    let fwd = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| median_ms(runs, || f(inputs).map(|_| ()));
    let both = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        median_ms(runs, || (f(&vars)? * &w)?.sum_all()?.backward().map(|_| ()))
    };
    let (of, cf) = (fwd(ours)?, fwd(composed)?);
    let out = Var::from_tensor(&y)?;
    let harness = median_ms(runs, || {
        (out.as_tensor() * &w)?.sum_all()?.backward().map(|_| ())
    })?;
    let (ob, cb) = (both(ours)? - harness, both(composed)? - harness);
    println!(
        "{name:34} fwd {of:8.2} ms vs {cf:8.2} ms ({:4.2}x)   fwd+bwd {ob:8.2} ms vs {cb:8.2} ms ({:4.2}x)",
        cf / of,
        cb / ob
    );
    Ok(())
}

/// One decoding step's product `x @ W^T`, x [1, in], for a quantized W: ours against
/// candle's quantized matmul, forward only (a decoding step has no backward).
fn decode_case(format: GgmlDType, n: usize, k: usize) -> Result<()> {
    let wf = (uniform(&[n, k], 15)? * 0.02)?;
    let w = Arc::new(QuantizedMatrix::new(QTensor::quantize(&wf, format)?)?);
    let x = uniform(&[1, k], 16)?;
    let candle = QMatMul::from_qtensor(QTensor::quantize(&wf, format)?)?;
    let ours = median_ms(51, || ops::quantized_linear(&x, &w).map(|_| ()))?;
    let theirs = median_ms(51, || candle.forward(&x).map(|_| ()))?;
    println!(
        "{:34} fwd {ours:8.3} ms vs {theirs:8.3} ms ({:4.2}x)",
        format!("decode {format:?} {k} -> {n}"),
        theirs / ours
    );
    Ok(())
}

/// A prefill product `x @ W^T`, x [256, in], for a quantized W: ours against candle's
/// quantized matmul and against the float32 matmul of the same weight.
fn prefill_case(format: GgmlDType, m: usize, n: usize, k: usize) -> Result<()> {
    let wf = (uniform(&[n, k], 17)? * 0.02)?;
    let w = Arc::new(QuantizedMatrix::new(QTensor::quantize(&wf, format)?)?);
    let x = uniform(&[m, k], 18)?;
    let candle = QMatMul::from_qtensor(QTensor::quantize(&wf, format)?)?;
    let ours = median_ms(7, || ops::quantized_linear(&x, &w).map(|_| ()))?;
    let theirs = median_ms(7, || candle.forward(&x).map(|_| ()))?;
    let float = median_ms(7, || ops::linear(&x, &wf).map(|_| ()))?;
    let gops = 2.0 * (m * n * k) as f64 / ours / 1e6;
    println!(
        "{:34} fwd {ours:8.2} ms vs {theirs:8.2} ms ({:4.2}x), f32 {float:8.2} ms ({:4.2}x), {gops:.0} GOP/s",
        format!("prefill {format:?} [{m}, {k}] -> {n}"),
        theirs / ours,
        float / ours
    );
    Ok(())
}

fn main() -> Result<()> {
    let (t, h, ff, heads, hd, vocab) = (256, 896, 4864, 14, 64, 151_936);
    let quantized = || -> Result<()> {
        for format in [GgmlDType::Q4_0, GgmlDType::Q8_0] {
            decode_case(format, ff, h)?;
            decode_case(format, h, ff)?;
            prefill_case(format, t, ff, h)?;
            prefill_case(format, t, h, ff)?;
        }
        // The other formats run candle's kernels (ours = candle's here); the one shape of the
        // model every format takes: 4864 inputs is 19 k-quant super-blocks of 256, 896 is not.
        for format in [
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            decode_case(format, h, ff)?;
            prefill_case(format, t, h, ff)?;
        }
        Ok(())
    };
    if std::env::args().any(|a| a == "quantized") {
        return quantized();
    }
    println!("kernel (ours vs composed candle), medians of 7, f32 on the CPU");
    let x = uniform(&[1, t, h], 1)?;
    let g = uniform(&[h], 2)?;
    let b = uniform(&[h], 3)?;
    case(
        "rms_norm [256, 896]",
        &[x.clone(), g.clone()],
        &|a| ops::rms_norm(&a[0], &a[1], 1e-6),
        &|a| ops::rms_norm::rms_norm_composed(&a[0], &a[1], 1e-6),
    )?;
    case(
        "layer_norm [256, 896]",
        &[x.clone(), g, b],
        &|a| ops::layer_norm(&a[0], &a[1], &a[2], 1e-5),
        &|a| ops::layer_norm::layer_norm_composed(&a[0], &a[1], &a[2], 1e-5),
    )?;
    let q = uniform(&[1, t, heads, hd], 4)?;
    let cos = uniform(&[1, t, hd / 2], 5)?;
    let sin = uniform(&[1, t, hd / 2], 6)?;
    let (c2, s2) = (cos.clone(), sin.clone());
    case(
        "rope [256, 14, 64]",
        &[q],
        &|a| ops::rope(&a[0], &cos, &sin),
        &|a| ops::rope::rope_composed(&a[0], &c2, &s2),
    )?;
    let scores = uniform(&[1, heads, t, t], 7)?;
    case(
        "softmax [14, 256, 256]",
        std::slice::from_ref(&scores),
        &|a| ops::softmax_last_dim(&a[0]),
        &|a| candle_nn::ops::softmax(&a[0], D::Minus1),
    )?;
    let mask =
        metalcandle_core::nn::mask::attention_mask(1, t, 0, None, None, DType::F32, &Device::Cpu)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (q, k) = (
        uniform(&[1, 2, 7 * t, hd], 17)?,
        uniform(&[1, 2, t, hd], 18)?,
    );
    case(
        "attention probs 14 heads / 2 kv",
        &[q, k],
        &|a| ops::attention_probs(&a[0], &a[1], 7, 0.125, &mask),
        &|a| {
            let raw = a[0].matmul(&a[1].t()?)?.reshape((1, heads, t, t))?;
            let scores = (raw * 0.125)?.broadcast_add(&mask)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.reshape((1, 2, 7 * t, t))
        },
    )?;
    let gate = uniform(&[1, t, ff], 8)?;
    let up = uniform(&[1, t, ff], 9)?;
    case(
        "swiglu [256, 4864]",
        &[gate, up],
        &|a| ops::swiglu(&a[0], &a[1]),
        &|a| a[0].silu()? * &a[1],
    )?;
    let w = (uniform(&[ff, h], 10)? * 0.02)?;
    let w2 = w.clone();
    case(
        "frozen linear 896 -> 4864",
        std::slice::from_ref(&x),
        &|a| ops::linear(&a[0], &w),
        &|a| a[0].broadcast_matmul(&w2.t()?),
    )?;
    let (la, lb) = (
        (uniform(&[8, h], 11)? * 0.01)?,
        (uniform(&[ff, 8], 12)? * 0.01)?,
    );
    let wf = Weight::Float((uniform(&[ff, h], 10)? * 0.02)?);
    let w3 = wf.to_float()?;
    case(
        "lora linear 896 -> 4864, r=8",
        &[x, la, lb],
        &|a| ops::lora_linear(&a[0], &wf, None, &a[1], &a[2], 2.0),
        &|a| {
            ops::linear(&a[0], &w3)?
                + (a[0]
                    .broadcast_matmul(&a[1].t()?)?
                    .broadcast_matmul(&a[2].t()?)?
                    * 2.0)?
        },
    )?;
    let hidden = uniform(&[t, h], 13)?;
    let head = (uniform(&[vocab, h], 14)? * 0.02)?;
    let labels: Vec<i64> = (0..t as i64).map(|i| (i * 7919) % vocab as i64).collect();
    let (head2, l2) = (head.clone(), labels.clone());
    case(
        "LM head + cross-entropy, 151936",
        &[hidden],
        &|a| ops::lm_head_cross_entropy(&a[0], &head, &labels),
        &|a| ops::cross_entropy::cross_entropy_composed(&ops::linear(&a[0], &head2)?, &l2),
    )?;
    quantized()
}

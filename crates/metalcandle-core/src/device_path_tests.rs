//! Off the CPU every op takes its composed fallback. No GPU is needed to check that path: run
//! on CPU tensors with the kernels switched off (`ops::device_path::run`), it must give every
//! trainable parameter the gradient the CPU kernels give, never differentiate a frozen weight,
//! update like the kernels, and decode through the KV cache as a full forward does.

use crate::model::{Decoder, ForwardOptions};
use crate::ops::device_path;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::testing::{lm_batch, tiny_gpt2, tiny_llama, trajectory};
use crate::train::{train_step, Batch};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// One ignored label and one padded key.
fn batch() -> Batch {
    let mut b = lm_batch(vec![3, 9, 27, 1, 44, 8, 15, 2, 30, 7, 19, 5], 2);
    b.labels[4] = -100;
    b.attention_mask = Some(vec![1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]);
    b
}

fn lora(m: &mut Decoder) {
    m.add_lora(crate::testing::all_linear_lora(4, 8.0), 1)
        .unwrap();
}

/// One AdamW step, so LoRA's B (zero at initialisation) no longer zeroes A's gradient.
fn step(m: &mut Decoder) {
    let mut opt = Optimizer::new(OptimizerConfig {
        lr: 1e-2,
        ..Default::default()
    })
    .unwrap();
    train_step(m, &mut opt, &[batch()], None).unwrap();
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Each trainable parameter's gradient of the batch loss, and the frozen base matrices (the
/// model's linear and embedding weights, when an adapter is attached) that got one. Frozen
/// vectors (norm weights, biases) are left out: candle's elementwise backward also reduces the
/// gradient of an untracked operand, a cost of the order of the op itself, never a matmul.
fn gradients(m: &mut Decoder) -> (HashMap<String, Tensor>, Vec<String>) {
    let vars = m.make_trainable().unwrap();
    let view = m.tracked(&vars);
    let (loss, _) = view.loss(&batch()).unwrap();
    let store = loss.backward().unwrap();
    let base_got_one = view
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| m.has_adapter() && t.rank() == 2 && store.get(t).is_some())
        .map(|(n, _)| n)
        .collect();
    let grads = vars
        .iter()
        .map(|(n, v)| {
            let g = store.get(v).unwrap_or_else(|| panic!("{n}: no gradient"));
            (n.clone(), g.clone())
        })
        .collect();
    (grads, base_got_one)
}

/// The composed path gives every parameter a nonzero gradient equal to the kernels' one (to
/// f32 rounding), and none to a frozen matrix.
fn assert_same_gradients(mut m: Decoder) {
    let (want, base_want) = gradients(&mut m.clone());
    let (got, base_got) = device_path::run(|| gradients(&mut m));
    assert!(
        base_want.is_empty() && base_got.is_empty(),
        "frozen matrices differentiated: kernels {base_want:?}, composed path {base_got:?}"
    );
    assert_eq!(want.len(), got.len());
    for (name, w) in &want {
        let g = &got[name];
        let scale = max_abs(w);
        assert!(scale > 0.0, "{name}: zero gradient");
        let d = max_abs(&(g - w).unwrap());
        assert!(
            d <= 1e-4 * scale,
            "{name}: |composed - kernel| = {d}, |kernel| = {scale}"
        );
    }
}

#[test]
fn full_fine_tune_gradients_match_the_kernels() {
    assert_same_gradients(tiny_llama(5));
    assert_same_gradients(tiny_gpt2(5));
}

#[test]
fn lora_gradients_match_the_kernels_and_leave_the_base_alone() {
    for mut m in [tiny_llama(5), tiny_gpt2(5)] {
        lora(&mut m);
        step(&mut m);
        assert_same_gradients(m);
    }
}

#[test]
fn qlora_gradients_match_the_kernels() {
    let mut m = tiny_llama(5);
    m.quantize(&|_| Some(GgmlDType::Q8_0)).unwrap();
    lora(&mut m);
    step(&mut m);
    assert_same_gradients(m);
}

#[test]
fn training_steps_follow_the_kernels() {
    let run = |m: &mut Decoder| {
        let config = OptimizerConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..Default::default()
        };
        trajectory(m, config, 3, |m, opt| {
            train_step(m, opt, &[batch()], Some(1.0)).unwrap().loss
        })
    };
    let (want_loss, want_w) = run(&mut tiny_llama(5));
    let (got_loss, got_w) = device_path::run(|| run(&mut tiny_llama(5)));
    for (a, b) in want_loss.iter().zip(&got_loss) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    // AdamW divides by sqrt(v): where a gradient is near zero, rounding differences between
    // the two paths move a weight by a part of lr; the fixtures' bound on trained weights.
    for (a, b) in want_w.iter().flatten().zip(got_w.iter().flatten()) {
        assert!((a - b).abs() < 5e-4, "weight {a} vs {b}");
    }
}

/// Greedy tokens decoded through the KV cache on the composed path, and the full forward's
/// logits for the whole sequence on the kernels.
#[test]
fn cached_decoding_matches_the_full_forward() {
    let m = tiny_llama(5);
    let prompt = [3u32, 9, 27, 1];
    let steps = 6;
    let (tokens, cached) = device_path::run(|| {
        let mut cache = m.new_cache();
        let opts = ForwardOptions::default();
        let mut tokens = prompt.to_vec();
        let mut input = Tensor::new(&prompt[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut last = vec![];
        for _ in 0..steps {
            let logits = m.forward_last(&input, &opts, Some(&mut cache)).unwrap();
            let next = logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()[0];
            last.push(logits.squeeze(0).unwrap());
            tokens.push(next);
            input = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
        (tokens, last)
    });
    let ids = Tensor::new(&tokens[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (full, _) = m.forward(&ids, &ForwardOptions::default(), None).unwrap();
    for (i, logits) in cached.iter().enumerate() {
        let want = full.get(0).unwrap().get(prompt.len() - 1 + i).unwrap();
        let d = max_abs(&(logits - &want).unwrap());
        assert!(d < 1e-5, "decode step {i}: logits differ by {d}");
        let next = want.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(next, tokens[prompt.len() + i], "decode step {i}");
    }
}

/// Half precision runs on the composed path everywhere; its loss stays near f32's.
#[test]
fn bf16_loss_is_near_f32() {
    let m = tiny_llama(5);
    let (want, _) = m.detached().loss(&batch()).unwrap();
    let mut half = m.clone();
    half.visit_mut(&mut |_, t| *t = t.to_dtype(DType::BF16).unwrap());
    half.dtype = DType::BF16;
    let (got, _) = half.detached().loss(&batch()).unwrap();
    let (want, got) = (
        want.to_scalar::<f32>().unwrap(),
        got.to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    );
    assert!((want - got).abs() < 2e-2 * want, "f32 {want}, bf16 {got}");
}

//! The fused path against the composed one (the reference): one step's loss and every
//! parameter gradient, multi-step trajectories, and checkpointing's bit-identity.

use crate::model::Decoder;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::testing::{
    gpt2_config, llama_config, lm_batch, max_abs, qwen2_config, rand_tensor, random_model,
    token_ids, with,
};
use crate::train::{train_step_with, Batch, Masks, StepOptions, StepPath};
use candle_core::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;

fn model(config: Value, seed: u64) -> Decoder {
    let mut m = random_model(config, seed);
    // Larger than the 0.02 init, so every path through the block carries a visible gradient.
    m.visit_mut(&mut |name, t| {
        if !name.contains("norm") && !name.contains("ln_") {
            *t = t.affine(5.0, 0.0).unwrap();
        }
    });
    m
}

fn tiny_custom() -> Value {
    json!({
        "model_type": "custom-transformer", "vocab_size": 40, "d_model": 32, "n_layers": 2,
        "n_heads": 4, "n_kv_heads": 4, "d_ff": 48, "max_seq_len": 16, "norm": "rmsnorm",
        "mlp": "swiglu", "positions": "rope", "tie_embeddings": true
    })
}

/// A LayerNorm custom model with an untied head, three heads of 8.
fn custom_layernorm(mlp: &str, positions: &str) -> Value {
    json!({
        "model_type": "custom-transformer", "vocab_size": 30, "d_model": 24,
        "n_layers": 2, "n_heads": 3, "d_ff": 40, "max_seq_len": 16, "norm": "layernorm",
        "mlp": mlp, "positions": positions, "tie_embeddings": false
    })
}

fn batch(seed: u64, b: usize, t: usize, vocab: usize, mask: bool) -> Batch {
    let mut batch = lm_batch(token_ids(b * t, vocab, seed), b);
    batch.labels[2] = -100;
    // Left padding on the last row: its first two tokens are masked keys and ignored labels.
    batch.attention_mask = mask.then(|| {
        let mut m = vec![1i64; b * t];
        for j in 0..2 {
            m[(b - 1) * t + j] = 0;
            batch.labels[(b - 1) * t + j] = -100;
        }
        m
    });
    batch
}

type Grads = (f64, HashMap<String, Tensor>);

/// The masks of the step after `step` optimizer steps, at the spec's rate (none at 0), for a
/// worker whose micro-batches start at global rows 3 and 5 (another worker holds the rows
/// before), so the row offsets are part of what the paths must agree on.
fn step_masks(m: &Decoder, step: u64) -> Masks<'static> {
    Masks {
        p: m.spec.dropout,
        seed: 11,
        step,
        first_rows: &[3, 5],
    }
}

fn composed(m: &mut Decoder, batches: &[Batch]) -> Grads {
    let vars = m.make_trainable().unwrap();
    let total = total_tokens(batches);
    let masks = step_masks(m, 2);
    let view = m.tracked(&vars);
    let (loss, _, g) = crate::train::accumulate(&view, &vars, batches, total, masks).unwrap();
    (loss, g)
}

fn fused(m: &mut Decoder, batches: &[Batch], ckpt: bool) -> Grads {
    fused_at(m, batches, ckpt, 2)
}

/// The fused step after `step` optimizer steps (which picks its dropout masks).
fn fused_at(m: &mut Decoder, batches: &[Batch], ckpt: bool, step: u64) -> Grads {
    assert_eq!(super::ineligible(m), None);
    let names: Vec<String> = m
        .make_trainable()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let total = total_tokens(batches);
    let masks = step_masks(m, step);
    let opts = StepOptions {
        gradient_checkpointing: ckpt,
        ..Default::default()
    };
    let a = super::accumulate(m, &names, batches, total, masks, opts).unwrap();
    let mut named = m.named_parameters();
    m.visit_adapter_mut(&mut |n, t| named.push((n.to_string(), t.clone())));
    let e = m.engine.0.as_ref().unwrap();
    let grads = named
        .into_iter()
        .filter_map(|(n, t)| {
            let o = *e.offsets.get(&n)?;
            let g = &e.flat[o..o + t.elem_count()];
            Some((n, Tensor::from_slice(g, t.shape(), t.device()).unwrap()))
        })
        .collect();
    (a.loss, grads)
}

fn total_tokens(batches: &[Batch]) -> usize {
    batches
        .iter()
        .map(|b| {
            b.shifted_labels()
                .unwrap()
                .iter()
                .filter(|&&l| l != -100)
                .count()
        })
        .sum()
}

/// Loss and every gradient within 1e-5 of the composed path's own scale, and every
/// parameter trained.
fn check(config: Value, batches: &[Batch]) {
    check_with(config, batches, |_| {});
}

/// [`check`] on a model that `setup` changed first (hooks attached, say).
fn check_with(config: Value, batches: &[Batch], setup: impl Fn(&mut Decoder)) {
    let mut m = model(config, 3);
    setup(&mut m);
    let (lc, gc) = composed(&mut m, batches);
    let (lf, gf) = fused(&mut m, batches, false);
    assert!((lf - lc).abs() <= 1e-6 * lc.abs(), "loss {lf} vs {lc}");
    assert_eq!(gc.len(), m.named_parameters().len());
    assert_eq!(gf.len(), gc.len());
    for (name, c) in &gc {
        let f = &gf[name];
        assert_eq!(f.dims(), c.dims(), "{name}");
        let scale = max_abs(c);
        if name.ends_with("k_proj.bias") && scale < 1e-6 {
            // Without RoPE, adding b to every key adds q.b to a whole row of scores, which the
            // softmax cancels: the gradient is zero, both paths leave rounding noise.
            assert!(
                max_abs(f) < 1e-6 && scale < 1e-6,
                "{name}: {} {scale}",
                max_abs(f)
            );
            continue;
        }
        assert_matches(name, f, c);
    }
}

/// The fused path's gradient `f` within 1e-5 of the largest entry of the composed path's `c`,
/// which must not be all zero.
fn assert_matches(name: &str, f: &Tensor, c: &Tensor) {
    let (scale, diff) = (max_abs(c), max_abs(&(f - c).unwrap()));
    assert!(scale > 0.0, "{name}: zero gradient on the composed path");
    assert!(
        diff <= 1e-5 * scale,
        "{name}: |fused - composed| {diff} vs scale {scale}"
    );
}

#[test]
fn tiny_config_gradients_match_the_composed_path() {
    check(tiny_custom(), &[batch(1, 3, 9, 40, false)]);
}

#[test]
fn llama_gqa_untied_gradients_match() {
    check(
        llama_config(48, 32, 40, false),
        &[batch(2, 2, 7, 48, false), batch(3, 2, 7, 48, false)],
    );
}

#[test]
fn qwen2_biases_gqa_sliding_window_and_padding_match() {
    let config = with(
        qwen2_config(48, 32, 40),
        json!({"num_key_value_heads": 1, "use_sliding_window": true, "sliding_window": 3,
            "max_window_layers": 1}),
    );
    check(config, &[batch(4, 3, 8, 48, true)]);
}

#[test]
fn gpt2_gradients_match() {
    check(gpt2_config(48, 32), &[batch(5, 2, 10, 48, true)]);
}

#[test]
fn layernorm_gelu_and_sinusoidal_relu_customs_match() {
    for (mlp, positions) in [
        ("gelu", "learned"),
        ("relu", "sinusoidal"),
        ("gelu_tanh", "rope"),
    ] {
        check(
            custom_layernorm(mlp, positions),
            &[batch(6, 2, 9, 30, false)],
        );
    }
}

#[test]
fn checkpointing_gives_the_same_bits() {
    let batches = [batch(7, 3, 9, 40, true), batch(8, 3, 9, 40, false)];
    let mut m = model(tiny_custom(), 4);
    let (l0, g0) = fused(&mut m, &batches, false);
    let (l1, g1) = fused(&mut m, &batches, true);
    assert_eq!(l0.to_bits(), l1.to_bits());
    for (name, a) in &g0 {
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            g1[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
    }
}

/// Losses of several AdamW steps with micro-batches and clipping, on one path.
fn trajectory(fused: bool, ckpt: bool) -> Vec<f64> {
    let mut m = model(tiny_custom(), 5);
    let mut opt = Optimizer::new(OptimizerConfig {
        lr: 3e-3,
        ..Default::default()
    })
    .unwrap();
    (0..4)
        .map(|s| {
            let batches = [
                batch(10 + s, 2, 9, 40, false),
                batch(20 + s, 2, 9, 40, true),
            ];
            let stats = train_step_with(
                &mut m,
                &mut opt,
                &batches,
                StepOptions {
                    max_grad_norm: Some(0.5),
                    fused,
                    gradient_checkpointing: ckpt,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(stats.path == StepPath::Fused, fused);
            assert!(stats.grad_norm > 0.5, "clipping should engage");
            stats.loss
        })
        .collect()
}

#[test]
fn trajectories_match_the_composed_path() {
    let c = trajectory(false, false);
    let f = trajectory(true, false);
    for (a, b) in f.iter().zip(&c) {
        assert!((a - b).abs() <= 1e-6 * b.abs(), "{f:?} vs {c:?}");
    }
    assert_eq!(trajectory(true, true), f);
}

/// A LoRA adapter on every linear of `config` (B made nonzero, so A gets a gradient too):
/// each adapter gradient within 1e-5 of the composed path's scale, the base frozen.
fn check_lora(config: Value, batches: &[Batch]) {
    let mut m = model(config, 3);
    let adapted = m
        .add_lora(crate::testing::all_linear_lora(3, 6.0), 9)
        .unwrap();
    m.visit_adapter_mut(&mut |name, t| {
        if name.contains("lora_B") {
            *t = rand_tensor(t.dims(), 17)
                .to_dtype(candle_core::DType::F32)
                .unwrap();
        }
    });
    let (lc, gc) = composed(&mut m, batches);
    let (lf, gf) = fused(&mut m, batches, false);
    assert!((lf - lc).abs() <= 1e-6 * lc.abs(), "loss {lf} vs {lc}");
    assert_eq!(
        gc.len(),
        2 * adapted,
        "composed: one gradient per adapter matrix"
    );
    assert_eq!(gf.len(), gc.len());
    for (name, c) in &gc {
        assert!(name.contains(".lora_"), "{name}: the base is frozen");
        assert_matches(name, &gf[name], c);
    }
}

#[test]
fn lora_on_every_linear_matches_the_composed_path() {
    check_lora(tiny_custom(), &[batch(1, 3, 9, 40, false)]);
    check_lora(
        qwen2_config(48, 32, 40),
        &[batch(4, 3, 8, 48, true), batch(5, 3, 8, 48, false)],
    );
}

/// GPT-2's fused c_attn: q, k and v are row ranges of one adapted linear.
#[test]
fn lora_on_gpt2_fused_qkv_matches() {
    check_lora(gpt2_config(48, 32), &[batch(5, 2, 10, 48, true)]);
}

fn with_dropout(config: Value, p: f64) -> Value {
    with(config, json!({ "dropout": p }))
}

#[test]
fn dropout_gradients_match_the_composed_path() {
    // Every site: embedding, attention probabilities (with padding), both residual branches.
    check(
        with_dropout(tiny_custom(), 0.25),
        &[batch(1, 3, 9, 40, true), batch(2, 3, 9, 40, false)],
    );
    check(
        with_dropout(custom_layernorm("gelu", "learned"), 0.4),
        &[batch(6, 2, 9, 30, false)],
    );
}

#[test]
fn dropout_is_drawn_per_step_and_recomputed_exactly_under_checkpointing() {
    let batches = [batch(1, 2, 9, 40, false)];
    let mut m = model(with_dropout(tiny_custom(), 0.25), 3);
    let (l2, g2) = fused(&mut m, &batches, false);
    let (c2, gc2) = fused(&mut m, &batches, true);
    assert_eq!(l2, c2);
    for (name, g) in &g2 {
        let same = (g - &gc2[name]).unwrap();
        assert_eq!(
            max_abs(&same),
            0.0,
            "{name}: checkpointing redrew another mask"
        );
    }
    // Another step draws other masks; rate 0 draws none.
    let (l3, _) = fused_at(&mut m, &batches, false, 3);
    m.spec.dropout = 0.0;
    let (l0, _) = fused(&mut m, &batches, false);
    assert!(
        (l3 - l2).abs() > 1e-3 && (l0 - l2).abs() > 1e-3,
        "{l0} {l2} {l3}"
    );
}

#[test]
fn hooks_between_blocks_run_on_the_fused_path_with_the_composed_gradients() {
    use crate::hooks::{BackwardAction, ForwardAction};
    let hooked = |m: &mut Decoder| {
        m.hooks.add_forward("embed", ForwardAction::Scale(0.7));
        m.hooks.add_forward(
            "layers.0.residual",
            ForwardAction::Clamp {
                min: -2.0,
                max: 2.0,
            },
        );
        m.hooks
            .add_backward("layers.1.residual", BackwardAction::Scale(3.0));
        m.hooks.add_forward("final_norm", ForwardAction::Scale(1.3));
        m.hooks
            .add_forward("layers.*.residual", ForwardAction::Capture { full: false });
    };
    check_with(
        with_dropout(tiny_custom(), 0.1),
        &[batch(1, 3, 9, 40, true)],
        hooked,
    );
    // The clamp engages, so the island's backward is not the identity.
    let mut m = model(tiny_custom(), 3);
    hooked(&mut m);
    let plain = fused(
        &mut model(tiny_custom(), 3),
        &[batch(1, 3, 9, 40, true)],
        false,
    )
    .0;
    assert!((fused(&mut m, &[batch(1, 3, 9, 40, true)], false).0 - plain).abs() > 1e-3);
    // Captures alone observe: the step is the unhooked one, bit for bit, and they recorded.
    let mut watched = model(tiny_custom(), 3);
    watched
        .hooks
        .add_forward("layers.*.residual", ForwardAction::Capture { full: true });
    let (lw, gw) = fused(&mut watched, &[batch(1, 3, 9, 40, true)], false);
    let (lp, gp) = fused(
        &mut model(tiny_custom(), 3),
        &[batch(1, 3, 9, 40, true)],
        false,
    );
    assert_eq!(lw, lp);
    for (name, g) in &gp {
        assert_eq!(max_abs(&(g - &gw[name]).unwrap()), 0.0, "{name}");
    }
    assert_eq!(watched.hooks.take_captured().len(), 2);
    // A hook inside a block still takes the composed path, named.
    m.hooks
        .add_forward("layers.1.attn_probs", ForwardAction::Scale(1.0));
    let why = super::ineligible(&m).unwrap();
    assert!(why.contains("layers.1.attn_probs"), "{why}");
}

#[test]
fn phi3s_fused_gate_up_takes_the_composed_path_named() {
    // The plan reads gate and up as separate linears; a fused one would be misread.
    let m = model(crate::testing::phi3_config(40, 16, 24), 1);
    let why = super::ineligible(&m).unwrap();
    assert!(why.contains("gate_up_proj"), "{why}");
}

//! The decoder against transformers without the Python package: each checkpoint in
//! tests/fixtures/ loaded by the core's loader, its logits and hidden states on the recorded
//! inputs compared with the outputs transformers recorded (`golden.npz`), plain and left-padded,
//! within the README's forward tolerance (the one the Python parity tests use).

mod npz;

use candle_core::{Device, Tensor};
use metalcandle_core::weights::load_hf_folder;
use metalcandle_core::{Decoder, ForwardOptions};
use npz::Array;
use std::collections::HashMap;
use std::path::PathBuf;

/// Absolute: the README's float32 noise is under 2e-6 and its subtlest bug moves logits 6.5e-4.
const ATOL_FORWARD: f32 = 5e-5;

/// The models of the fixtures, each with a `golden.npz`.
const MODELS: [&str; 7] = [
    "tiny-qwen2",
    "tiny-llama",
    "tiny-gpt2",
    "tiny-mistral-sw",
    "tiny-phi3",
    "tiny-qwen2-layer-types",
    "tiny-qwen2-max-window",
];

/// The repository's fixtures, or the copy METALCANDLE_FIXTURES names (as for the Python tests).
fn fixtures() -> PathBuf {
    match std::env::var_os("METALCANDLE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

fn ids(a: &Array) -> Tensor {
    let v: Vec<u32> = a.i64s().iter().map(|&x| x as u32).collect();
    Tensor::from_vec(v, a.shape.as_slice(), &Device::Cpu).unwrap()
}

/// Fails, naming the element, where `got` is further than the tolerance from `want` at a
/// position `compared` accepts (by flat index).
fn assert_close(what: &str, got: &Tensor, want: &Array, compared: impl Fn(usize) -> bool) {
    assert_eq!(got.dims(), want.shape.as_slice(), "{what}: shape");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let (mut worst, mut at) = (0f32, 0);
    for (i, (g, w)) in got.iter().zip(want.f32s()).enumerate() {
        let d = (g - w).abs();
        // A NaN fails the comparison and stays the worst.
        if compared(i) && !worst.is_nan() && (d.is_nan() || d > worst) {
            (worst, at) = (d, i);
        }
    }
    assert!(
        worst <= ATOL_FORWARD,
        "{what}: |ours - transformers| = {worst} at flat index {at} (ours {}, transformers {}), \
         over {ATOL_FORWARD}",
        got[at],
        want.f32s()[at]
    );
}

fn check(name: &str) {
    let dir = fixtures().join(name);
    let model: Decoder =
        load_hf_folder(&dir, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let g: HashMap<String, Array> = npz::read(&dir.join("golden.npz"));

    let opts = ForwardOptions {
        output_hidden_states: true,
        ..Default::default()
    };
    let (logits, hidden) = model.forward(&ids(&g["input_ids"]), &opts, None).unwrap();
    assert_close(&format!("{name} logits"), &logits, &g["logits"], |_| true);
    let hidden = Tensor::stack(&hidden, 0).unwrap();
    assert_close(
        &format!("{name} hidden_states"),
        &hidden,
        &g["hidden_states"],
        |_| true,
    );

    // Left padding: only the unmasked positions are defined (the README).
    let mask = g["pad_attention_mask"].i64s();
    let opts = ForwardOptions {
        attention_mask: Some(mask),
        position_ids: Some(g["pad_position_ids"].i64s()),
        ..Default::default()
    };
    let (logits, _) = model
        .forward(&ids(&g["pad_input_ids"]), &opts, None)
        .unwrap();
    let vocab = logits.dim(2).unwrap();
    assert_close(
        &format!("{name} pad_logits"),
        &logits,
        &g["pad_logits"],
        |i| mask[i / vocab] == 1,
    );
}

#[test]
fn qwen2_tied_head_and_qkv_biases() {
    check("tiny-qwen2");
}

#[test]
fn llama_untied() {
    check("tiny-llama");
}

#[test]
fn gpt2_conv1d_learned_positions() {
    check("tiny-gpt2");
}

#[test]
fn mistral_sliding_window() {
    check("tiny-mistral-sw");
}

#[test]
fn phi3_fused_qkv_and_gate_up() {
    check("tiny-phi3");
}

#[test]
fn qwen2_windows_by_layer_types() {
    check("tiny-qwen2-layer-types");
}

#[test]
fn qwen2_windows_by_max_window_layers() {
    check("tiny-qwen2-max-window");
}

/// A fixture model added later is checked here too, or this fails.
#[test]
fn every_fixture_model_is_covered() {
    let mut found: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("golden.npz").is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut covered = MODELS.map(String::from).to_vec();
    covered.sort();
    assert_eq!(found, covered);
}

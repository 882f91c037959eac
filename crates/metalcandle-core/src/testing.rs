//! What the unit tests share: small random models of each architecture and seeded random data,
//! so that every failure reproduces from its seed.

use crate::lora::LoraConfig;
use crate::model::Decoder;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::rng::Rng;
use crate::spec::ModelSpec;
use crate::train::Batch;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};

/// Two Llama layers: RMSNorm, RoPE, SwiGLU, 4 query heads over 2 kv heads.
pub(crate) fn llama_config(vocab: usize, hidden: usize, ff: usize, tied: bool) -> Value {
    json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ff, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied
    })
}

/// Qwen2: the Llama layout with q/k/v biases and a tied head.
pub(crate) fn qwen2_config(vocab: usize, hidden: usize, ff: usize) -> Value {
    with(
        llama_config(vocab, hidden, ff, true),
        json!({"model_type": "qwen2"}),
    )
}

/// Phi-3: the Llama layout with q|k|v and gate|up each in one projection, no biases.
pub(crate) fn phi3_config(vocab: usize, hidden: usize, ff: usize) -> Value {
    with(
        llama_config(vocab, hidden, ff, false),
        json!({"model_type": "phi3"}),
    )
}

/// Two GPT-2 layers: LayerNorm, GELU, learned positions, biases, fused QKV, tied head, 4 heads.
pub(crate) fn gpt2_config(vocab: usize, hidden: usize) -> Value {
    json!({
        "model_type": "gpt2", "vocab_size": vocab, "n_embd": hidden, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "layer_norm_epsilon": 1e-5
    })
}

/// `config` with the keys of `changes` set (added or replaced).
pub(crate) fn with(mut config: Value, changes: Value) -> Value {
    let Value::Object(changes) = changes else {
        panic!("changes must be a JSON object, got {changes}")
    };
    for (k, v) in changes {
        config[k] = v;
    }
    config
}

/// A model of `config` with seeded random weights.
pub(crate) fn random_model(config: Value, seed: u64) -> Decoder {
    let spec = ModelSpec::from_hf_config(&config, "config").unwrap();
    Decoder::random(spec, config, seed, &Device::Cpu).unwrap()
}

/// A random two-layer Llama (`llama_config`) of the given sizes.
pub(crate) fn llama(vocab: usize, hidden: usize, ff: usize, tied: bool, seed: u64) -> Decoder {
    random_model(llama_config(vocab, hidden, ff, tied), seed)
}

/// The Llama most tests share: vocabulary 48, hidden 32, intermediate 64, untied head.
pub(crate) fn tiny_llama(seed: u64) -> Decoder {
    llama(48, 32, 64, false, seed)
}

/// The GPT-2 most tests share: vocabulary 48, hidden 32.
pub(crate) fn tiny_gpt2(seed: u64) -> Decoder {
    random_model(gpt2_config(48, 32), seed)
}

/// A Llama whose every matrix input (hidden 64, intermediate 96) is a whole number of q4_0 and
/// q8_0 blocks (32 values); vocabulary 64.
pub(crate) fn quantizable_llama(tied: bool, seed: u64) -> Decoder {
    llama(64, 64, 96, tied, seed)
}

/// LoRA of rank `r` on every linear layer, without dropout.
pub(crate) fn all_linear_lora(r: usize, alpha: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout: 0.0,
        use_rslora: false,
        target_modules: vec!["all-linear".into()],
        layers_to_transform: None,
    }
}

/// `n` seeded values, uniform in [-1, 1).
pub(crate) fn uniform(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| 2.0 * rng.uniform() - 1.0).collect()
}

/// A float64 CPU tensor of `uniform` values.
pub(crate) fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(uniform(n, seed), shape, &Device::Cpu).unwrap()
}

/// `n` seeded token ids below `vocab`.
pub(crate) fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// A language-modelling batch of `ids` in `rows` rows: every token its own label, no padding.
pub(crate) fn lm_batch(ids: Vec<u32>, rows: usize) -> Batch {
    let labels = ids.iter().map(|&x| x as i64).collect();
    let t = ids.len() / rows;
    Batch {
        ids: Tensor::from_vec(ids, (rows, t), &Device::Cpu).unwrap(),
        labels,
        attention_mask: None,
        pre_shifted: false,
    }
}

/// The losses of `steps` steps from a fresh optimizer of `config` (`step` takes one and returns
/// its loss), and every parameter's values after them, flattened in `named_parameters` order.
pub(crate) fn trajectory(
    m: &mut Decoder,
    config: OptimizerConfig,
    steps: usize,
    step: impl Fn(&mut Decoder, &mut Optimizer) -> f64,
) -> (Vec<f64>, Vec<Vec<f32>>) {
    let mut opt = Optimizer::new(config).unwrap();
    let losses = (0..steps).map(|_| step(m, &mut opt)).collect();
    let weights = m
        .named_parameters()
        .iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    (losses, weights)
}

/// The largest |a_i - b_i|.
pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The largest |t_i| of an f32 tensor.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |got - want| / max |want| over two f32 tensors of one shape.
pub(crate) fn max_rel_diff(got: &Tensor, want: &Tensor) -> f32 {
    max_abs(&(got - want).unwrap()) / max_abs(want)
}

//! What the unit tests share.

use crate::lora::LoraConfig;
use crate::model::Decoder;
use crate::spec::ModelSpec;
use candle_core::Device;
use serde_json::json;

/// A random two-layer Llama (4 query heads over 2 kv heads) of the given sizes.
pub(crate) fn llama(vocab: usize, hidden: usize, ff: usize, tied: bool, seed: u64) -> Decoder {
    let config = json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": ff, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied
    });
    let spec = ModelSpec::from_hf_config(&config, "config").unwrap();
    Decoder::random(spec, config, seed, &Device::Cpu).unwrap()
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

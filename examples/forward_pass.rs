//! The Rust core on its own: `cargo run --example forward_pass [HF_FOLDER]`.
//! With no argument it builds a small random Qwen2-shaped model.

use candle_core::{Device, Tensor};
use metalcandle_core::weights::load_hf_folder;
use metalcandle_core::{Decoder, ForwardOptions, ModelSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let model = match std::env::args().nth(1) {
        Some(dir) => load_hf_folder(std::path::Path::new(&dir), &dev)?,
        None => {
            let config = serde_json::json!({
                "model_type": "qwen2", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "rms_norm_eps": 1e-6,
                "rope_theta": 1e6, "max_position_embeddings": 512, "tie_word_embeddings": true
            });
            let spec = ModelSpec::from_hf_config(&config, "built-in config")?;
            Decoder::random(spec, config, 0, &dev)?
        }
    };
    println!("architecture: {}", model.spec.architecture.as_str());
    println!("config: {}", model.config);
    println!("parameters: {}", model.num_parameters());
    let vocab = model.spec.vocab_size as u32;
    let ids: Vec<u32> = (0..2 * 16).map(|i| (i * 7 + 3) % vocab).collect();
    let ids = Tensor::from_vec(ids, (2, 16), &dev)?;
    let (logits, _) = model.forward(&ids, &ForwardOptions::default(), None)?;
    println!("input_ids: {:?}", ids.dims());
    println!("logits: {:?}", logits.dims());
    Ok(())
}

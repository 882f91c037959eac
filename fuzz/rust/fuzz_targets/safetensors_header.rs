//! The JSON header of model.safetensors over the fixture's tensor bytes, beside its
//! config.json, loaded as a checkpoint folder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalcandle_fuzz::{fixtures, load_scratch_folder, scratch};
use std::sync::OnceLock;

/// tiny-qwen2's tensor bytes, after its header.
fn fixture_data() -> &'static [u8] {
    static DATA: OnceLock<Vec<u8>> = OnceLock::new();
    DATA.get_or_init(|| {
        let qwen = fixtures().join("tiny-qwen2");
        std::fs::copy(qwen.join("config.json"), scratch().join("config.json")).expect("config");
        let raw = std::fs::read(qwen.join("model.safetensors")).expect("fixture weights");
        let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
        raw[8 + n..].to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    let tensors = fixture_data();
    let mut file = (data.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(data);
    file.extend_from_slice(tensors);
    load_scratch_folder("model.safetensors", &file, "model.safetensors");
});

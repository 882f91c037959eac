//! adapter_config.json SEP adapter_model.safetensors, loaded onto the fixture's base model.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_core::weights::load_hf_folder;
use metalcandle_core::Decoder;
use metalcandle_fuzz::{expect, fixtures, run_one_token, scratch, split, write};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static BASE: OnceLock<Decoder> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        load_hf_folder(&fixtures().join("tiny-qwen2"), &Device::Cpu).expect("fixture model")
    });
    let (cfg, weights) = split(data);
    let dir = scratch();
    write(&dir.join("adapter_config.json"), cfg);
    write(&dir.join("adapter_model.safetensors"), weights);
    // A clone shares the base's tensors: each input starts from the model without an adapter.
    let mut m = base.clone();
    if expect(m.load_adapter(dir), &["adapter_"]).is_some() {
        run_one_token(&m);
    }
});

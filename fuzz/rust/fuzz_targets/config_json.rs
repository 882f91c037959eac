//! config.json beside the fixture's weights, loaded as a checkpoint folder: the config's
//! sizes are checked against the tensors the file holds.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_core::weights::load_hf_folder;
use metalcandle_fuzz::{expect, fixtures, run_one_token, scratch, write};
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let weights = fixtures().join("tiny-qwen2/model.safetensors");
        std::fs::copy(weights, scratch().join("model.safetensors")).expect("fixture weights");
    });
    let dir = scratch();
    write(&dir.join("config.json"), data);
    let dir_name = dir.display().to_string();
    if let Some(m) = expect(
        load_hf_folder(dir, &Device::Cpu),
        &["config.json", &dir_name],
    ) {
        run_one_token(&m);
    }
});

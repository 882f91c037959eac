//! config.json beside the fixture's weights, loaded as a checkpoint folder: the config's
//! sizes are checked against the tensors the file holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalcandle_fuzz::{fixtures, load_scratch_folder, scratch};
use std::sync::Once;

fuzz_target!(|data: &[u8]| {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let weights = fixtures().join("tiny-qwen2/model.safetensors");
        std::fs::copy(weights, scratch().join("model.safetensors")).expect("fixture weights");
    });
    load_scratch_folder("config.json", data, "config.json");
});

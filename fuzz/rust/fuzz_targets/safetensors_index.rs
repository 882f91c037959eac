//! model.safetensors.index.json beside two shards (the fixture's tensors split in two) and the
//! fixture's config.json, loaded as a checkpoint folder.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_fuzz::{fixtures, load_scratch_folder, scratch};
use std::collections::HashMap;
use std::sync::Once;

/// The shard names and the split seed.py's index names: the fixture's tensors in name order,
/// the first half in shard 1.
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

fn setup() {
    let qwen = fixtures().join("tiny-qwen2");
    std::fs::copy(qwen.join("config.json"), scratch().join("config.json")).expect("config");
    let all = candle_core::safetensors::load(qwen.join("model.safetensors"), &Device::Cpu)
        .expect("fixture weights");
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let half = names.len() / 2;
    for (i, part) in [&names[..half], &names[half..]].into_iter().enumerate() {
        let shard: HashMap<String, _> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, scratch().join(SHARDS[i])).expect("shard");
    }
}

fuzz_target!(|data: &[u8]| {
    static SETUP: Once = Once::new();
    SETUP.call_once(setup);
    load_scratch_folder("model.safetensors.index.json", data, "index.json");
});

//! A whole GGUF file: its metadata, its tokenizer, then the model, which is run on one token.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_core::quant::gguf::{gguf_metadata, gguf_tokenizer_json, load_gguf};
use metalcandle_fuzz::{expect, run_one_token, scratch, write};

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("model.gguf");
    write(&path, data);
    let name = ["model.gguf"];
    if expect(gguf_metadata(&path), &name).is_none() {
        return;
    }
    expect(gguf_tokenizer_json(&path), &name);
    if let Some(m) = expect(load_gguf(&path, &Device::Cpu), &name) {
        run_one_token(&m);
    }
});

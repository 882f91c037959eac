//! One safetensors file: its header, then every tensor it declares.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_core::weights::reader::TensorFiles;
use metalcandle_fuzz::{expect, scratch, write};

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("model.safetensors");
    write(&path, data);
    let Some(files) = expect(
        TensorFiles::open(std::slice::from_ref(&path)),
        &["model.safetensors"],
    ) else {
        return;
    };
    // A header that passed the checks promised these bytes: reading them cannot fail.
    for name in files.names() {
        if let Err(e) = files.load(name, &Device::Cpu) {
            panic!("tensor `{name}` was accepted but does not read: {e}");
        }
    }
});

//! optimizer.json SEP optimizer.safetensors, loaded, then one step on two parameters with
//! the names seed.py's state uses.
#![no_main]

use candle_core::{Device, Tensor, Var};
use libfuzzer_sys::fuzz_target;
use metalcandle_core::optim::{Optimizer, OptimizerConfig};
use metalcandle_fuzz::{expect, scratch, split, write};
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let (meta, moments) = split(data);
    let dir = scratch();
    write(&dir.join("optimizer.json"), meta);
    write(&dir.join("optimizer.safetensors"), moments);
    let mut opt = Optimizer::new(OptimizerConfig::default()).expect("default optimizer");
    if expect(opt.load(dir, &Device::Cpu), &["optimizer"]).is_none() {
        return;
    }
    let dev = &Device::Cpu;
    let param =
        |n: usize| Var::from_tensor(&Tensor::ones(n, candle_core::DType::F32, dev).unwrap());
    let params = vec![
        ("w".to_string(), param(4).unwrap()),
        ("b".to_string(), param(2).unwrap()),
    ];
    let grads: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().affine(0.5, 0.0).unwrap()))
        .collect();
    // Loaded state must fit the parameters it names, or the step names the file.
    expect(opt.step(&params, &grads), &["optimizer.safetensors"]);
});

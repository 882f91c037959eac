//! A config document turned into a spec, checked, and (when small) built and run: sizes from
//! the config must be refused before anything is allocated for them.
#![no_main]

use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use metalcandle_core::limits::{check_model_size, elem_count};
use metalcandle_core::weights::names::param_specs;
use metalcandle_core::{Decoder, ModelSpec};
use metalcandle_fuzz::{expect, run_one_token};

/// Specs up to this many parameters are built: a few MB of float32, milliseconds to initialise.
const BUILD_LIMIT: usize = 1 << 18;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if !cfg.is_object() {
        return;
    }
    let Some(spec) = expect(ModelSpec::from_hf_config(&cfg, "config"), &["config"]) else {
        return;
    };
    if expect(check_model_size(&spec, "config"), &["config"]).is_none() {
        return;
    }
    let params = param_specs(&spec)
        .iter()
        .try_fold(0usize, |n, p| n.checked_add(elem_count(&p.shape)?));
    if params.is_some_and(|n| n <= BUILD_LIMIT) {
        if let Some(m) = expect(Decoder::random(spec, cfg, 0, &Device::Cpu), &[]) {
            run_one_token(&m);
        }
    }
});

//! Sizes read from files and configs, checked against the machine before anything is allocated:
//! a header or config field that asks for more memory than exists is an error naming the field,
//! not an allocation that aborts the process.

use crate::error::{Error, Result};
use crate::spec::ModelSpec;
use crate::weights::names::param_specs;

/// More layers than any published decoder has by two orders of magnitude; a count beyond it is a
/// corrupt or hostile config, refused before a per-layer spec is built for each.
pub const MAX_LAYERS: usize = 8192;

/// The machine's physical memory in bytes (Linux: /proc/meminfo), if known.
pub fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}

/// An error naming `key` when `bytes` (None: the count overflowed) cannot fit in memory.
pub fn check_bytes(context: &str, key: &str, what: &str, bytes: Option<u64>) -> Result<()> {
    let limit = physical_memory().unwrap_or(u64::MAX / 2);
    match bytes {
        Some(b) if b <= limit => Ok(()),
        _ => Err(Error::config(
            context,
            key,
            format!(
                "{what} would need {}, more than this machine's {:.1} GiB of memory",
                bytes.map_or("more than 2^64 bytes".to_string(), |b| format!(
                    "{:.1} GiB",
                    b as f64 / (1u64 << 30) as f64
                )),
                limit as f64 / (1u64 << 30) as f64
            ),
        )),
    }
}

/// A layer count from a config, refused above MAX_LAYERS.
pub fn check_layers(context: &str, key: &str, n: usize) -> Result<usize> {
    if n > MAX_LAYERS {
        return Err(Error::config(
            context,
            key,
            format!("{n} layers is more than the {MAX_LAYERS} this loader accepts"),
        ));
    }
    Ok(n)
}

/// The number of elements of `shape`, or None when it overflows.
pub fn elem_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Refuses a spec whose float32 parameters cannot fit in memory, naming the field that dominates.
pub fn check_model_size(spec: &ModelSpec, context: &str) -> Result<()> {
    let mut embed = Some(0u64);
    let mut layers = Some(0u64);
    for p in param_specs(spec) {
        let n = elem_count(&p.shape).map(|n| n as u64);
        let slot = if p.place.layer().is_some() {
            &mut layers
        } else {
            &mut embed
        };
        *slot = slot.zip(n).and_then(|(a, b)| a.checked_add(b));
    }
    let total = embed.zip(layers).and_then(|(a, b)| a.checked_add(b));
    let key = match (embed, layers) {
        (Some(e), Some(l)) if l > e => "num_hidden_layers",
        (_, None) => "num_hidden_layers",
        _ => "vocab_size",
    };
    let what = format!(
        "a model of {} parameters (vocab_size {}, hidden size {}, {} layers) as float32",
        total.map_or("more than 2^64".into(), |t| t.to_string()),
        spec.vocab_size,
        spec.hidden_size,
        spec.num_layers()
    );
    check_bytes(context, key, &what, total.and_then(|t| t.checked_mul(4)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_memory_are_refused_naming_the_key() {
        let cfg = serde_json::json!({"model_type": "custom-transformer", "vocab_size": 1_000_000_000u64,
            "d_model": 4096, "n_layers": 2, "n_heads": 4, "d_ff": 64, "max_seq_len": 8});
        let spec = ModelSpec::from_hf_config(&cfg, "cfg").unwrap();
        let e = check_model_size(&spec, "cfg").unwrap_err().to_string();
        assert!(e.contains("vocab_size") && e.contains("GiB"), "{e}");
        let small = serde_json::json!({"model_type": "custom-transformer", "vocab_size": 10,
            "d_model": 8, "n_layers": 2, "n_heads": 2, "d_ff": 16, "max_seq_len": 8});
        check_model_size(&ModelSpec::from_hf_config(&small, "cfg").unwrap(), "cfg").unwrap();
        assert!(check_layers("c", "n_layers", MAX_LAYERS + 1).is_err());
        assert_eq!(elem_count(&[1 << 40, 1 << 40]), None);
    }
}

//! What the fuzz targets share: the scratch folder each input is written to, multi-file inputs,
//! and the contract every input is held to.
//!
//! The contract: the reader returns a value, or the core's `Error` whose message names the file
//! at fault. A panic (libFuzzer aborts on any, caught or not), an abort from a failed allocation,
//! a hang (-timeout) or a header-driven allocation (-rss_limit_mb, -malloc_limit_mb) is a crash.

use candle_core::{Device, Tensor};
use metalcandle_core::weights::load_hf_folder;
use metalcandle_core::{Decoder, Error};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The largest single allocation an input may cause. No input here (a few hundred KB at most)
/// needs anything near it, so a bigger request was sized by a header field; failing it aborts,
/// which libFuzzer reports as a crash with the input. This holds without a sanitizer, where
/// -malloc_limit_mb has no allocator hooks to work with, and catches zeroed allocations that
/// never touch their pages and so never show in -rss_limit_mb.
pub const MAX_ALLOC: usize = 512 << 20;

struct Limited;

// SAFETY: every request goes to the system allocator unchanged, or fails with a null pointer,
// which the standard collections answer with `handle_alloc_error` (an abort).
unsafe impl GlobalAlloc for Limited {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOC {
            return std::ptr::null_mut();
        }
        System.realloc(p, l, new_size)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Limited = Limited;

/// Multi-file inputs are split on it, as the Python targets do (fuzz/targets.py).
pub const SEP: &[u8] = b"\n--8<--\n";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// This process's scratch folder, made once: each input overwrites the files it names, so
/// the fixture files a target copies there at start-up are not copied again per input.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mc-fuzz-rs-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("scratch folder");
        d
    })
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("scratch file");
}

/// `a SEP b` as (a, b); without SEP, all of it is `a`.
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.windows(SEP.len()).position(|w| w == SEP) {
        Some(i) => (&data[..i], &data[i + SEP.len()..]),
        None => (data, &[]),
    }
}

/// The contract: Ok, or an error naming one of `names` (the file at fault; empty: any message).
pub fn expect<T>(r: Result<T, Error>, names: &[&str]) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = e.to_string();
            if verbose() {
                eprintln!("error: {msg}");
            }
            assert!(
                names.is_empty() || names.iter().any(|n| msg.contains(n)),
                "the error names none of {names:?}: {msg}"
            );
            None
        }
    }
}

/// MC_FUZZ_VERBOSE=1 prints every error an input gets (to see what the seeds reach).
fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("MC_FUZZ_VERBOSE").is_some())
}

/// A loaded model must also run: one token through it, which may fail (a context of 0
/// positions) but not panic.
pub fn run_one_token(model: &Decoder) {
    let ids = Tensor::new(&[[0u32]], &Device::Cpu).expect("ids");
    let _ = model.forward(&ids, &Default::default(), None);
}

/// `bytes` written as the scratch folder's `file`, the folder loaded as a checkpoint, and one
/// token run through what loads; an error must name `label` (the file) or the folder.
pub fn load_scratch_folder(file: &str, bytes: &[u8], label: &str) {
    let dir = scratch();
    write(&dir.join(file), bytes);
    let dir_name = dir.display().to_string();
    if let Some(m) = expect(load_hf_folder(dir, &Device::Cpu), &[label, &dir_name]) {
        run_one_token(&m);
    }
}

"""What the benchmarks share: the Qwen2.5-0.5B shape, the timing loop and resident-memory
readings. Imports nothing heavy, so a PyTorch worker process can use it without loading
metalcandle."""

from __future__ import annotations

import os
import resource
import sys
import time

QWEN25_05B = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def peak_rss_mib() -> float:
    # On Linux ru_maxrss keeps the parent's peak across fork + exec, so a worker started by a
    # large parent would report the parent's peak; VmHWM belongs to this process's address space.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return mib(int(line.split()[1]) * 1024)  # "VmHWM:  123456 kB"
    except OSError:
        pass  # no procfs (macOS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return mib(peak if sys.platform == "darwin" else peak * 1024)


def timed(fn, runs: int) -> tuple[list[float], object]:
    """One untimed warm-up call (first-touch allocations, thread-pool start-up, kernel choice),
    then `runs` timed calls; returns the times and the last call's result. Callers take the
    median of the times."""
    result = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return mib(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return None  # no procfs (macOS): only the peak is reported

"""What the benchmarks share: the Qwen2.5-0.5B shape, the timing loop, resident-memory readings
and the worker processes each measurement runs in. Imports nothing heavy, so a PyTorch worker
process can use it without loading metalcandle."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
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


def _proc_mib(path: str, key: str) -> float | None:
    """The MiB of a `key:  123456 kB` line of a procfs file, or None without procfs (macOS)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return mib(int(line.split()[1]) * 1024)
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    # On Linux ru_maxrss keeps the parent's peak across fork + exec, so a worker started by a
    # large parent would report the parent's peak; VmHWM belongs to this process's address space.
    peak = _proc_mib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
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


def minor_faults() -> int:
    """Page faults served without I/O so far: first touches of freshly mapped memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def available_mib() -> float | None:
    """MemAvailable: what the machine can still give without swapping."""
    return _proc_mib("/proc/meminfo", "MemAvailable")


def _rss_of(pid: int) -> float | None:
    return _proc_mib(f"/proc/{pid}/status", "VmRSS")


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    n = str(threads)
    env.update(
        {
            # Read once when each library starts, hence a fresh process per measurement.
            "RAYON_NUM_THREADS": n,
            "OMP_NUM_THREADS": n,
            "OPENBLAS_NUM_THREADS": n,
            "MKL_NUM_THREADS": n,
            "VECLIB_MAXIMUM_THREADS": n,
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    return env


def add_bench_args(ap: argparse.ArgumentParser, workers: dict) -> None:
    """The options every side-by-side bench takes, and the hidden ones `run_worker` calls it back with."""
    ap.add_argument("--no-torch", action="store_true", help="measure metalcandle alone")
    ap.add_argument("--json", help="also write the full report here")
    ap.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)


def serve_worker(args, workers: dict, first=None) -> bool:
    """In a process `run_worker` started: runs the named worker on its spec and prints the JSON
    result (after `first(name)`'s fields, when given). False in the parent process."""
    if not args.worker:
        return False
    result = dict(first(args.worker)) if first else {}
    result.update(workers[args.worker](json.loads(args.spec)))
    print(json.dumps(result))
    return True


def run_worker(script: str, name: str, spec: dict, threads: int, rss_cap_mib: float | None = None) -> dict:
    """Runs `script --worker name --spec JSON` in a fresh process and returns the JSON object it
    prints last, or {"error": ...}. With `rss_cap_mib` the worker is stopped once its resident
    memory passes the cap, so a measurement that would not fit cannot push a shared machine into
    swapping or the OOM killer."""
    print(f"  {name:<24} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script), "--worker", name, "--spec", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(threads),
    )
    over = None
    if rss_cap_mib is not None:
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            if rss is not None and rss > rss_cap_mib:
                over = rss
                proc.kill()
                break
            time.sleep(0.2)
    out, err = proc.communicate()
    took = time.perf_counter() - t0
    if over is not None:
        print(f" stopped at {over:.0f} MiB after {took:.0f} s (cap {rss_cap_mib:.0f} MiB)", file=sys.stderr)
        return {"error": f"stopped at {over:.0f} MiB resident, over the cap of {rss_cap_mib:.0f} MiB"}
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        print(f" FAILED after {took:.0f} s\n{tail}", file=sys.stderr, flush=True)
        return {"error": tail.splitlines()[-1] if tail else f"exit status {proc.returncode}"}
    result = json.loads(out.strip().splitlines()[-1])
    shown = f"{result['tokens_per_s']} tokens/s" if "tokens_per_s" in result else "done"
    print(f" {shown} ({took:.0f} s)", file=sys.stderr, flush=True)
    return result


def exit_unless_installed(bench: str, packages, pip_command: str) -> None:
    """Exits with status 2, saying how to install them, when any of the PyTorch side's `packages`
    is missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        print(
            f"{bench} needs {', '.join(missing)} for the PyTorch side. Install them with\n\n"
            f"    {pip_command}\n\nor pass --no-torch to measure metalcandle alone.",
            file=sys.stderr,
        )
        sys.exit(2)


def torch_train_step(model, ids, lr: float, weight_decay: float, max_grad_norm: float):
    """The PyTorch side's training step: a closure taking one AdamW step (made here, before the
    first step) of the transformers causal LM `model` on `ids`, labels = ids, with the gradient
    norm clipped to `max_grad_norm`; it returns the loss."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def write_report(path, report: dict) -> None:
    """Writes `report` as indented JSON to `path` (a --json option), when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def ratio(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row):
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join(line(r) for r in rows)

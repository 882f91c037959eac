"""metalcandle next to llama.cpp on the same GGUF files: one randomly initialised
Qwen2.5-0.5B-shaped model written by `save_gguf` in float32, q8_0 and q4_0, then

  prefill   llama.cpp: `llama-bench -p 256`; metalcandle: the same 256-token prompt as
            `generate` processes it (into a fresh KV cache, logits of the last position only,
            as llama.cpp computes them), tokens/s
  decode    llama.cpp: `llama-bench -n 64` (64 tokens from an empty context); metalcandle: 64
            greedy tokens after a 16-token prompt with the KV cache, tokens/s

with the same thread count on both sides, and the machine's limits (f32 matmul GFLOP/s and
memory read GB/s, measured as benches/compare_torch.py does).

    python benches/llama_cpp_compare.py [--llama-bench PATH] [--threads 2] [--runs 3]
                                        [--layers N] [--formats f32,q8_0,q4_0] [--json out.json]

llama-bench is taken from --llama-bench, else from the build cache that
`bash .ci/build_llama_cpp.sh` fills ($METALCANDLE_LLAMA_CPP_DIR, default
~/.cache/metalcandle/llama.cpp); without one, metalcandle runs alone and the script says how to
build llama.cpp (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import warnings

from common import QWEN25_05B, run_worker, worker_env

PREFILL, DECODE = 256, 64
HERE = os.path.dirname(os.path.abspath(__file__))
# The metalcandle and machine measurements are compare_torch.py's workers, so both benchmarks
# time the same calls.
COMPARE_TORCH = os.path.join(HERE, "compare_torch.py")
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tiny-qwen2", "tokenizer.json")


def save(fmt: str, layers: int | None, path: str) -> None:
    """Runs in its own process: the float model is dropped with it."""
    import metalcandle as mc

    config = dict(QWEN25_05B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    model = mc.Model.from_config(config, seed=0)
    if fmt != "f32":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mc.quantize_model(model, fmt)
    # llama.cpp needs a tokenizer in the file; save_gguf pads its vocabulary to the model's.
    model.save_gguf(path, tokenizer=TOKENIZER)


def find_llama_bench(given: str | None) -> str | None:
    if given:
        if not os.access(given, os.X_OK):
            sys.exit(f"--llama-bench {given}: not an executable file")
        return given
    cache = os.environ.get("METALCANDLE_LLAMA_CPP_DIR", os.path.expanduser("~/.cache/metalcandle/llama.cpp"))
    found = sorted(glob.glob(os.path.join(cache, "*", "build", "bin", "llama-bench")))
    return found[-1] if found else None


def llama_bench(binary: str, path: str, threads: int, runs: int) -> dict:
    cmd = [binary, "-m", path, "-p", str(PREFILL), "-n", str(DECODE), "-t", str(threads)]
    cmd += ["-r", str(runs), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(threads), check=False)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"error": " / ".join(tail) or f"exit status {proc.returncode}"}
    out = {}
    for entry in json.loads(proc.stdout):
        task = "prefill" if entry.get("n_prompt", 0) > 0 else "decode"
        out[task] = round(float(entry["avg_ts"]), 2)
    return out


def fmt_rate(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def table(results: dict) -> str:
    header = ["format", "prefill llama.cpp", "prefill mc", "ratio", "decode llama.cpp", "decode mc", "ratio"]
    rows = [header]
    for fmt, r in results.items():
        row = [fmt]
        for task in ("prefill", "decode"):
            lc, mc = r["llama.cpp"].get(task), r["metalcandle"].get(task)
            row += [fmt_rate(lc), fmt_rate(mc), "-" if not (lc and mc) else f"{mc / lc:.2f}x"]
        rows.append(row)
    widths = [max(len(x[i]) for x in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(x, widths, strict=True)) for x in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median / mean)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 24, the real model's)")
    ap.add_argument("--formats", default="f32,q8_0,q4_0")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        save(args.worker, args.layers, args.out)
        return
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    binary = find_llama_bench(args.llama_bench)
    if binary is None:
        print(
            "no llama-bench found: build llama.cpp with `bash .ci/build_llama_cpp.sh` (see "
            "docs/benchmarks.md) or pass --llama-bench PATH; measuring metalcandle alone",
            file=sys.stderr,
        )
    results = {}
    with tempfile.TemporaryDirectory(prefix="llama_cpp_compare-") as tmp:
        for fmt in formats:
            path = os.path.join(tmp, f"{fmt}.gguf")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", fmt, "--out", path]
            if args.layers is not None:
                cmd += ["--layers", str(args.layers)]
            subprocess.run(cmd, check=True, env=worker_env(args.threads))
            print(f"{fmt}: {os.path.getsize(path) / 2**20:.0f} MiB", file=sys.stderr)
            spec = {"path": path, "runs": args.runs, "threads": args.threads}
            mc = {}
            for task, worker in (("prefill", "prompt"), ("decode", "decode")):
                r = run_worker(COMPARE_TORCH, f"metalcandle:{worker}", spec, args.threads)
                mc[task] = r.get("tokens_per_s")
            lc = llama_bench(binary, path, args.threads, args.runs) if binary else {}
            if "error" in lc:
                print(f"  llama-bench failed: {lc['error']}", file=sys.stderr)
            results[fmt] = {
                "metalcandle": mc,
                "llama.cpp": lc,
                "gguf_mib": round(os.path.getsize(path) / 2**20),
            }
    machine = run_worker(COMPARE_TORCH, "numpy:machine", {"threads": args.threads}, args.threads)
    layers = args.layers or QWEN25_05B["num_hidden_layers"]
    print(
        f"Qwen2.5-0.5B-shaped, random, {layers} layers, same GGUF files, {args.threads} threads; "
        f"tokens/s, ratio = metalcandle / llama.cpp"
    )
    print(table(results))
    if "error" not in machine:
        print(
            f"machine: {machine['matmul_gflops']} GFLOP/s f32 matmul, {machine['read_gbps']} GB/s read "
            f"(numpy); llama-bench: {binary or 'not found'}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"layers": layers, "threads": args.threads, "results": results, "machine": machine},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()

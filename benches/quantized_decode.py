"""Greedy decoding speed and memory of a randomly initialised Qwen2.5-0.5B-shaped model in float32,
q8_0 and q4_0: 64 new tokens after a 16-token prompt with the KV cache, median tokens/s over a few
runs, and resident memory (current RSS once the model is ready, and the process's peak RSS). Each
format runs in its own process so that one format's allocations do not inflate another's numbers.

    python benches/quantized_decode.py [--runs 3] [--layers 24] [--formats f32,q8_0,q4_0]
                                       [--via-gguf] [--json out.json]

By default each process builds the float model and quantizes it in place, so its peak RSS includes
the float32 weights it started from. With --via-gguf, a first process writes model.gguf and the
timed process loads it, which is what deployment sees: peak RSS then reflects the quantized size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from common import QWEN25_05B, current_rss_mib, mib, peak_rss_mib, timed

PROMPT_TOKENS = 16
NEW_TOKENS = 64


def model_config(layers: int | None) -> dict:
    config = dict(QWEN25_05B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def build(fmt: str, layers: int | None) -> tuple[object, dict]:
    import metalcandle as mc

    t0 = time.perf_counter()
    model = mc.Model.from_config(model_config(layers), seed=0)
    stats = {"init_s": round(time.perf_counter() - t0, 2), "rss_after_init_mib": current_rss_mib()}
    if fmt != "f32":
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # Qwen2.5-0.5B's shapes all take 32-weight blocks; nothing is expected to stay float.
            warnings.simplefilter("ignore")
            mc.quantize_model(model, fmt)
        stats["quantize_s"] = round(time.perf_counter() - t0, 2)
        stats["kept_float"] = sorted(model.last_quantization_report["kept_float"])
    return model, stats


def weight_bytes(model) -> int:
    info = model.quantization_info()
    quantized_weights = sum(int(np.prod(layer["shape"])) for layer in info["layers"].values())
    return info["quantized_bytes"] + 4 * (model.num_parameters() - quantized_weights)


def worker_save(fmt: str, layers: int | None, path: str) -> dict:
    model, stats = build(fmt, layers)
    model.save_gguf(path)
    stats["gguf_mib"] = mib(os.path.getsize(path))
    return stats


def worker_decode(fmt: str, layers: int | None, runs: int, gguf: str | None) -> dict:
    import metalcandle as mc

    if gguf is not None:
        t0 = time.perf_counter()
        model = mc.load_model(gguf)
        stats = {"load_s": round(time.perf_counter() - t0, 2)}
    else:
        model, stats = build(fmt, layers)
    stats["rss_ready_mib"] = current_rss_mib()
    stats["weights_mib"] = mib(weight_bytes(model))
    stats["parameters"] = model.num_parameters()
    prompt = np.random.default_rng(0).integers(0, QWEN25_05B["vocab_size"], size=(1, PROMPT_TOKENS))
    times, out = timed(lambda: model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[]), runs)
    assert out.shape == (1, PROMPT_TOKENS + NEW_TOKENS)
    median = float(np.median(times))
    stats.update(
        {
            "decode_s_median": round(median, 3),
            "tokens_per_s": round(NEW_TOKENS / median, 2),
            "rss_after_decode_mib": current_rss_mib(),
            "peak_rss_mib": peak_rss_mib(),
            "first_new_ids": out[0, PROMPT_TOKENS : PROMPT_TOKENS + 8].tolist(),
        }
    )
    return stats


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"worker {' '.join(args)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(fmt: str, layers: int | None, runs: int, via_gguf: bool) -> dict:
    common = ["--layers", str(layers)] if layers is not None else []
    if not via_gguf:
        return run_worker(["--worker", "decode", "--formats", fmt, "--runs", str(runs), *common])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.gguf")
        saved = run_worker(["--worker", "save", "--formats", fmt, "--gguf", path, *common])
        decoded = run_worker(["--worker", "decode", "--formats", fmt, "--runs", str(runs), "--gguf", path])
    return {**saved, **decoded}


def table(results: dict) -> str:
    base = results.get("f32")
    cols = [
        ("format", lambda f, r: f),
        ("weights MiB", lambda f, r: f"{r['weights_mib']:.1f}"),
        ("tokens/s", lambda f, r: f"{r['tokens_per_s']:.2f}"),
        ("RSS ready MiB", lambda f, r: "?" if r["rss_ready_mib"] is None else f"{r['rss_ready_mib']:.0f}"),
        ("peak RSS MiB", lambda f, r: f"{r['peak_rss_mib']:.0f}"),
    ]
    if base is not None:
        cols += [
            ("speed vs f32", lambda f, r: f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x"),
            ("weights vs f32", lambda f, r: f"{r['weights_mib'] / base['weights_mib']:.3f}"),
            (
                "RSS vs f32",
                lambda f, r: (
                    "?"
                    if r["rss_ready_mib"] is None or not base["rss_ready_mib"]
                    else f"{r['rss_ready_mib'] / base['rss_ready_mib']:.3f}"
                ),
            ),
        ]
    rows = [[name for name, _ in cols]] + [[fn(f, r) for _, fn in cols] for f, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed decodes per format (after one warm-up)")
    ap.add_argument("--layers", type=int, help="decoder layers (default: 24, the real model's)")
    ap.add_argument("--formats", default="f32,q8_0,q4_0")
    ap.add_argument("--via-gguf", action="store_true", help="time a model loaded from a saved GGUF file")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=["decode", "save"], help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    args = ap.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]

    if args.worker == "save":
        print(json.dumps(worker_save(formats[0], args.layers, args.gguf)))
        return
    if args.worker == "decode":
        print(json.dumps(worker_decode(formats[0], args.layers, args.runs, args.gguf)))
        return

    results = {}
    for fmt in formats:
        results[fmt] = measure(fmt, args.layers, args.runs, args.via_gguf)
        print(f"{fmt}: {results[fmt]['tokens_per_s']} tokens/s", file=sys.stderr)
    layers = args.layers or QWEN25_05B["num_hidden_layers"]
    report = {
        "model": f"Qwen2.5-0.5B-shaped, random, {layers} layers",
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "runs": args.runs,
        "via_gguf": args.via_gguf,
        "threads": os.cpu_count(),
        "results": results,
    }
    print(report["model"] + f", greedy {NEW_TOKENS} new tokens after {PROMPT_TOKENS}, median of {args.runs}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

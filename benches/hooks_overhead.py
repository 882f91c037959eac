"""What hooks cost in a forward pass of a Qwen2.5-0.5B-shaped model (4 layers by default) at
[1, 256]: no hook attached (each point is one branch), a Rust capture of statistics at one point,
a Rust scale at every point, and a Python identity function (returning the array it is given, so
each point pays the round trip to Python and back) at every point. Median of a few runs, as ratios
to the unhooked forward.

    python benches/hooks_overhead.py [--layers 4] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import QWEN25_05B, timed

import metalcandle as mc


def median_forward_s(model, ids, runs: int) -> float:
    times, _ = timed(lambda: model.forward(ids), runs)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = mc.Model.from_config(dict(QWEN25_05B, num_hidden_layers=args.layers), seed=0)
    ids = np.random.default_rng(0).integers(0, QWEN25_05B["vocab_size"], size=(1, 256))
    cases = {
        "no hooks": [],
        "rust capture (stats) at layers.0.mlp_out": [("layers.0.mlp_out", "capture", {"full": False})],
        "rust scale(1.0) at every point": [("*", "scale", {"factor": 1.0})],
        # Returns x itself: returning None means "keep the value" and skips the array round trip.
        "python identity (returns x) at every point": [("*", lambda point, x: x, {})],
    }
    results = {}
    for name, hooks in cases.items():
        handles = [model.add_forward_hook(point, fn, **params) for point, fn, params in hooks]
        results[name] = median_forward_s(model, ids, args.runs)
        for h in handles:
            h.remove()
    base = results["no hooks"]
    print(f"forward [1, 256], {args.layers} layers, median of {args.runs}")
    for name, s in results.items():
        print(f"  {name:45s} {s * 1e3:8.1f} ms  {s / base:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": results, "ratio": {k: v / base for k, v in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()

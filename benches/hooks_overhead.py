"""What hooks cost in a forward pass of a Qwen2.5-0.5B-shaped model (4 layers by default) at
[1, 256]: no hook attached (each point is one branch), a Rust capture of statistics at one point,
a Rust scale at every point, and a Python identity function (returning the array it is given, so
each point pays the round trip to Python and back) at every point. Median of a few runs, as ratios
to the unhooked forward.

Then one training step of the README's tiny model shape (2 x 128 rows of a 99-symbol vocabulary):
hooks between blocks (embed, layers.N.residual, final_norm) keep the fused path, one inside a block
sends the step to the composed path; each case prints the path it ran on.

    python benches/hooks_overhead.py [--layers 4] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
from common import QWEN25_05B, timed, write_report

import metalcandle as mc


@contextlib.contextmanager
def hooked(model, hooks):
    """`model` with the forward hooks `hooks` ((point, fn, params) each) attached for the block."""
    handles = [model.add_forward_hook(point, fn, **params) for point, fn, params in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def median_forward_s(model, ids, runs: int) -> float:
    times, _ = timed(lambda: model.forward(ids), runs)
    return float(np.median(times))


TINY = {
    "model_type": "custom-transformer", "vocab_size": 99, "d_model": 128, "n_layers": 4, "n_heads": 4,
    "d_ff": 512, "max_seq_len": 128, "norm": "rmsnorm", "mlp": "swiglu", "positions": "rope",
}  # fmt: skip

STEP_CASES = {
    "no hooks": [],
    "rust capture (stats) at layers.*.residual": [("layers.*.residual", "capture", {"full": False})],
    "rust scale(1.0) at embed and final_norm": [
        ("embed", "scale", {"factor": 1.0}),
        ("final_norm", "scale", {"factor": 1.0}),
    ],
    "python identity at layers.*.residual": [("layers.*.residual", lambda point, x: x, {})],
    "rust scale(1.0) at layers.0.mlp_out": [("layers.0.mlp_out", "scale", {"factor": 1.0})],
}  # fmt: skip


def training_steps(runs: int) -> dict:
    model = mc.Model.from_config(TINY, seed=0)
    trainer = mc.Trainer(model, mc.AdamW(lr=0.0))  # lr 0: every case steps the same weights
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(16, 128))
    out = {}
    for name, hooks in STEP_CASES.items():
        with hooked(model, hooks):
            times, _ = timed(lambda: trainer.step(ids), runs)
            out[name] = {"seconds": float(np.median(times)), "path": trainer.last_step_path}
    return out


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
        with hooked(model, hooks):
            results[name] = median_forward_s(model, ids, args.runs)
    base = results["no hooks"]
    print(f"forward [1, 256], {args.layers} layers, median of {args.runs}")
    for name, s in results.items():
        print(f"  {name:45s} {s * 1e3:8.1f} ms  {s / base:5.2f}x")
    steps = training_steps(args.runs)
    base_step = steps["no hooks"]["seconds"]
    shape = f"{TINY['n_layers']} layers x {TINY['d_model']}"
    print(f"training step [16, 128], tiny model ({shape}), median of {args.runs}")
    for name, r in steps.items():
        print(f"  {name:45s} {r['seconds'] * 1e3:8.1f} ms  {r['seconds'] / base_step:5.2f}x  {r['path']}")
    if args.json:
        ratio = {k: v / base for k, v in results.items()}
        write_report(args.json, {"seconds": results, "ratio": ratio, "training_step": steps})


if __name__ == "__main__":
    main()

"""Times the training step of the README's main job (examples/configs/tiny-from-scratch.toml:
d_model 128, 4 layers, SwiGLU, RMSNorm, RoPE, tied, char vocabulary, batch 16 x 128) on the
fused path, the fused path with activation checkpointing, and the composed per-op path, side
by side in one run, and prints tokens/s and the ratios.

    python benches/fused_step.py [--steps 10] [--batch 16] [--seq 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import timed, write_report

import metalcandle as mc

TINY = {
    "model_type": "custom-transformer",
    "vocab_size": 96,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 4,
    "d_ff": 352,
    "max_seq_len": 128,
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "positions": "rope",
    "tie_embeddings": True,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    cfg = dict(TINY, max_seq_len=max(args.seq, TINY["max_seq_len"]))
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(args.batch, args.seq))
    result = {"batch": [args.batch, args.seq]}
    for label, fused, ckpt in [
        ("fused", True, False),
        ("checkpointed", True, True),
        ("composed", False, False),
    ]:
        model = mc.Model.from_config(cfg, seed=0)
        trainer = mc.Trainer(
            model,
            mc.AdamW(lr=3e-3, weight_decay=0.01),
            max_grad_norm=1.0,
            gradient_checkpointing=ckpt,
            fused=fused,
        )
        trainer.step(ids)  # buffers, first-touch pages
        times, _ = timed(lambda t=trainer: t.step(ids), args.steps)
        assert trainer.last_step_path == ("fused" if fused else "composed")
        med = float(np.median(times))
        result[label] = {"step_s_median": round(med, 4), "tokens_per_s": round(ids.size / med)}
    for label in ("fused", "checkpointed"):
        result[f"{label}_vs_composed"] = round(
            result[label]["tokens_per_s"] / result["composed"]["tokens_per_s"], 2
        )
    print(json.dumps(result, indent=2))
    write_report(args.json, result)


if __name__ == "__main__":
    main()

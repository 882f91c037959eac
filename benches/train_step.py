"""Times training steps on a randomly initialised Qwen2.5-0.5B-shaped model (float32) at batch
1 x 256 tokens: LoRA r=8 on all seven linear projections, and reports tokens/s and peak RSS.

    python benches/train_step.py [--steps 3] [--seq 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import QWEN25_05B, peak_rss_mib, timed, write_report

import metalcandle as mc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = mc.Model.from_config(QWEN25_05B, seed=0)
    load_s = time.perf_counter() - t0
    rss_model = peak_rss_mib()
    model.add_lora(r=8, alpha=16, target_modules="all-linear", seed=0)
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-4), max_grad_norm=1.0)
    ids = np.random.default_rng(0).integers(0, QWEN25_05B["vocab_size"], size=(1, args.seq))
    times, _ = timed(lambda: trainer.step(ids), args.steps)
    med = float(np.median(times))
    result = {
        "model": "Qwen2.5-0.5B-shaped, random, float32",
        "parameters": model.num_parameters(),
        "lora_trainable": sum(v.size for v in model.trainable_parameters().values()),
        "batch": [1, args.seq],
        "init_s": round(load_s, 2),
        "step_s_median": round(med, 3),
        "tokens_per_s": round(args.seq / med, 1),
        "rss_after_init_mib": round(rss_model),
        "peak_rss_mib": round(peak_rss_mib()),
    }
    print(json.dumps(result, indent=2))
    write_report(args.json, result)


if __name__ == "__main__":
    main()

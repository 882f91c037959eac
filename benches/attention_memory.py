"""Peak resident memory of one training step as the sequence grows, on an attention-heavy shape
(2 layers, 16 heads of width 4, hidden 64, batch 1, vocabulary 256): the fused path, whose
attention keeps only each row's log-sum-exp, against the composed per-op path, which keeps the
[batch, heads, T, T] probabilities for its backward.

    python benches/attention_memory.py [--seqs 1024,2048,4096] [--threads 2]
                                       [--paths fused,composed] [--cap-mib N] [--json out.json]

Attention memory linear in T shows as a growth of about 2x per doubling of T (everything else
in this model is linear too); the composed path's [T, T] probabilities grow 4x. Each (path, T)
runs in its own process, so its peak RSS (VmHWM) is its own; a worker is stopped once it passes
--cap-mib (default: what /proc/meminfo says is available, less 1 GiB) and reported as stopped.
"""

from __future__ import annotations

import argparse
import json
import sys

from common import available_mib, format_table, peak_rss_mib, ratio, run_worker

SHAPE = {
    "model_type": "custom-transformer",
    "vocab_size": 256,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 16,
    "n_kv_heads": 16,
    "d_ff": 128,
    "norm": "rmsnorm",
    "mlp": "swiglu",
    "positions": "rope",
    "tie_embeddings": True,
}
PATHS = {"fused": True, "composed": False}
MARGIN_MIB = 1024


def worker(spec: dict) -> dict:
    import time

    import numpy as np

    import metalcandle as mc

    model = mc.Model.from_config({**SHAPE, "max_seq_len": spec["seq"]}, seed=0)
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-3), max_grad_norm=1.0, fused=spec["fused"])
    ids = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(1, spec["seq"]), dtype=np.int64)
    before = peak_rss_mib()
    t0 = time.perf_counter()
    loss = float(trainer.step(ids, labels=ids).loss)
    return {
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_step_mib": before,
        "step_s": round(time.perf_counter() - t0, 3),
        "loss": round(loss, 5),
        "path": trainer.last_step_path,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="1024,2048,4096")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"a subset of {','.join(PATHS)}")
    ap.add_argument("--cap-mib", type=float, help="stop a worker above this RSS (default: available - 1 GiB)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.spec))))
        return
    try:
        seqs = [int(s) for s in args.seqs.split(",") if s.strip()]
    except ValueError:
        sys.exit(f"--seqs: expected comma-separated integers, got {args.seqs!r}")
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not seqs or min(seqs) < 2 or any(p not in PATHS for p in paths):
        sys.exit(f"--seqs must be integers >= 2 and --paths a subset of {','.join(PATHS)}")

    results: dict = {p: {} for p in paths}
    for p in paths:
        for t in seqs:
            avail = available_mib()
            cap = args.cap_mib
            if avail is not None:
                cap = min(cap or float("inf"), avail - MARGIN_MIB)
            spec = {"seq": t, "fused": PATHS[p]}
            # One worker function; the name run_worker passes is only its label.
            results[p][t] = run_worker(__file__, f"{p} T={t}", spec, args.threads, rss_cap_mib=cap)

    steps = [f"x{a}->{b}" for a, b in zip(seqs, seqs[1:], strict=False)]
    rows = [["path", *[f"T={t} MiB" for t in seqs], *steps]]
    for p in paths:
        peaks = [results[p][t].get("peak_rss_mib") for t in seqs]
        cells = [
            f"{x:.0f}" if x is not None else results[p][t].get("error", "?")
            for x, t in zip(peaks, seqs, strict=True)
        ]
        growth = [ratio(peaks[i + 1], peaks[i]) for i in range(len(seqs) - 1)]
        rows.append([p, *cells, *[f"{g:.2f}" if g is not None else "" for g in growth]])
    print(
        f"one training step, batch 1, {SHAPE['n_layers']} layers x {SHAPE['n_heads']} heads of width "
        f"{SHAPE['d_model'] // SHAPE['n_heads']}, {args.threads} threads: peak RSS"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": SHAPE, "threads": args.threads, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

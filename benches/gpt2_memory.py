"""Full fine-tuning of GPT-2 small (124M parameters: 12 x 768, vocab 50257, context 1024, random
weights) at batch B x 1024: peak resident memory and tokens/s of one training step, for
metalcandle with and without activation checkpointing and for torch (transformers
GPT2LMHeadModel) with and without `gradient_checkpointing_enable()` (torch.utils.checkpoint).

    python benches/gpt2_memory.py [--batch 8] [--seq 1024] [--steps 2] [--threads 2]
                                  [--variants mc,mc-ckpt,torch,torch-ckpt] [--cap-mib N]
                                  [--no-torch] [--json out.json]

Targets (issue: GPT-2's memory requirement, models up to 125M parameters on 8 GB): metalcandle
with checkpointing at batch 8 x 1024 within 8 GB peak RSS, at most 0.8x the peak of torch with
checkpointing and at least 1.2x its tokens/s.

The weights are made once by metalcandle (`Model.from_config` with transformers' `GPT2Config()`
values, seed 0) and saved as safetensors that every variant loads; every variant trains on the
same random ids with AdamW (lr 1e-4, weight decay 0.01) and gradient clipping at 1.0. Each runs in
its own process (its peak RSS is its own VmHWM) with the thread count in its environment. The
first of --steps steps is a warm-up (first-touch allocations, thread pools); tokens/s is over the
rest (with --steps 1, over that one step). The step-1 losses, which must agree, show that all ran
the same model on the same ids.

The machine may be shared: each worker is stopped once its resident memory passes --cap-mib
(default: what /proc/meminfo says is available when it starts, less 1 GiB), and reported as
stopped rather than allowed to swap. metalcandle with checkpointing needs `mc.Trainer(...,
gradient_checkpointing=True)`; a build without it reports "not available".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import (
    add_bench_args,
    available_mib,
    current_rss_mib,
    exit_unless_installed,
    format_table,
    minor_faults,
    peak_rss_mib,
    ratio,
    run_worker,
    serve_worker,
    torch_train_step,
)

# transformers' GPT2Config() defaults.
GPT2_SMALL = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": True,
}
LR, WEIGHT_DECAY, MAX_GRAD_NORM, SEED = 1e-4, 0.01, 1.0, 0
VARIANTS = {
    "mc": "metalcandle",
    "mc-ckpt": "metalcandle, checkpointing",
    "torch": "torch eager",
    "torch-ckpt": "torch, checkpointing",
}
REFERENCE = "torch-ckpt"
PEAK_TARGET_MIB = 8 * 1000**3 / 2**20  # 8 GB
MARGIN_MIB = 1024
PIP_COMMAND = "pip install torch --index-url https://download.pytorch.org/whl/cpu transformers"


def input_ids(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(0, vocab, size=(batch, seq), dtype=np.int64)


def train_steps(spec: dict, step) -> dict:
    """`step()` returns the loss; the first of spec["steps"] is untimed unless it is the only one."""
    rss_ready = current_rss_mib()
    losses, times, faults = [], [], []
    for _ in range(spec["steps"]):
        f0, t0 = minor_faults(), time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    timed = times[1:] or times
    tokens = spec["batch"] * spec["seq"]
    return {
        "tokens_per_s": round(tokens / statistics.median(timed), 2),
        "step_s": [round(t, 2) for t in times],
        "minor_faults": faults,
        "loss_first": round(losses[0], 5),
        "rss_ready_mib": rss_ready,
        "peak_rss_mib": peak_rss_mib(),
    }


def mc_build(spec: dict) -> dict:
    import metalcandle as mc

    model = mc.Model.from_config(GPT2_SMALL, seed=SEED)
    model.save_pretrained(spec["path"])
    # metalcandle writes the keys it reads; transformers gets GPT2Config()'s in full, with
    # dropout off: metalcandle's GPT-2 has none, and the step-1 losses are to agree.
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    with open(os.path.join(spec["path"], "config.json"), "w") as f:
        json.dump({**GPT2_SMALL, **no_dropout, "architectures": ["GPT2LMHeadModel"]}, f, indent=2)
    return {"parameters": model.num_parameters()}


def mc_worker(spec: dict, checkpointing: bool) -> dict:
    import inspect

    import metalcandle as mc

    if checkpointing and "gradient_checkpointing" not in inspect.signature(mc.Trainer).parameters:
        return {"not_available": "this metalcandle's Trainer has no gradient_checkpointing"}
    model = mc.load_model(spec["path"])
    extra = {"gradient_checkpointing": True} if checkpointing else {}
    opt = mc.AdamW(lr=LR, weight_decay=WEIGHT_DECAY)
    trainer = mc.Trainer(model, opt, max_grad_norm=MAX_GRAD_NORM, **extra)
    ids = input_ids(spec["batch"], spec["seq"], model.vocab_size)
    result = train_steps(spec, lambda: float(trainer.step(ids).loss))
    return {**result, "parameters": model.num_parameters()}


def torch_worker(spec: dict, checkpointing: bool) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(spec["threads"])
    model = GPT2LMHeadModel.from_pretrained(spec["path"], dtype=torch.float32)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.from_numpy(input_ids(spec["batch"], spec["seq"], model.config.vocab_size))
    result = train_steps(spec, torch_train_step(model, ids, LR, WEIGHT_DECAY, MAX_GRAD_NORM))
    return {**result, "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}


WORKERS = {
    "mc:build": mc_build,
    "mc": lambda spec: mc_worker(spec, checkpointing=False),
    "mc-ckpt": lambda spec: mc_worker(spec, checkpointing=True),
    "torch": lambda spec: torch_worker(spec, checkpointing=False),
    "torch-ckpt": lambda spec: torch_worker(spec, checkpointing=True),
}


def describe(results: dict, args) -> str:
    ref = results.get(REFERENCE, {})
    lines = [
        f"GPT-2 small, random weights, float32, full fine-tuning, batch {args.batch} x {args.seq}, "
        f"{args.threads} threads; ratios against {VARIANTS[REFERENCE]}",
        "",
    ]
    rows = [["", "peak RSS MiB", "x ref", "tokens/s", "x ref", "step s", "loss step 1"]]
    for key, r in results.items():
        name = VARIANTS[key]
        if "not_available" in r:
            rows.append([name, "not available", "", "", "", "", ""])
        elif "error" in r:
            rows.append([name, r["error"], "", "", "", "", ""])
        else:
            peak_x = ratio(r["peak_rss_mib"], ref.get("peak_rss_mib"))
            tps_x = ratio(r["tokens_per_s"], ref.get("tokens_per_s"))
            rows.append(
                [
                    name,
                    f"{r['peak_rss_mib']:.0f}",
                    "" if peak_x is None else f"{peak_x:.2f}",
                    f"{r['tokens_per_s']:.1f}",
                    "" if tps_x is None else f"{tps_x:.2f}",
                    " ".join(f"{t:.1f}" for t in r["step_s"]),
                    f"{r['loss_first']:.4f}",
                ]
            )
    lines.append(format_table(rows))
    ck = results.get("mc-ckpt", {})
    if "peak_rss_mib" in ck:
        lines += [
            "",
            f"targets at batch 8: peak <= {PEAK_TARGET_MIB:.0f} MiB (8 GB): {ck['peak_rss_mib']:.0f}; "
            f"<= 0.8x {VARIANTS[REFERENCE]}: {ratio(ck['peak_rss_mib'], ref.get('peak_rss_mib'))}; "
            f"tokens/s >= 1.2x: {ratio(ck['tokens_per_s'], ref.get('tokens_per_s'))}",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant, the first a warm-up (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"a subset of {','.join(VARIANTS)}")
    ap.add_argument("--cap-mib", type=float, help="stop a worker above this RSS (default: available - 1 GiB)")
    add_bench_args(ap, WORKERS)
    args = ap.parse_args()
    if serve_worker(args, WORKERS):
        return
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.no_torch:
        chosen = [v for v in chosen if not v.startswith("torch")]
    elif any(v.startswith("torch") for v in chosen):
        exit_unless_installed("gpt2_memory", ("torch", "transformers"), PIP_COMMAND)
    if args.batch < 1 or args.steps < 1 or not 2 <= args.seq <= GPT2_SMALL["n_positions"]:
        sys.exit(f"--batch and --steps must be >= 1, --seq in [2, {GPT2_SMALL['n_positions']}]")

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpt2_memory-") as tmp:
        path = os.path.join(tmp, "gpt2")
        print(f"building random GPT-2 small in {path}", file=sys.stderr)
        built = run_worker(__file__, "mc:build", {"path": path}, args.threads)
        if "error" in built:
            sys.exit("could not build the model")
        spec = {"path": path, "batch": args.batch, "seq": args.seq, "steps": args.steps}
        spec["threads"] = args.threads
        for key in chosen:
            avail = available_mib()
            cap = args.cap_mib
            if avail is not None:
                cap = min(cap or float("inf"), avail - MARGIN_MIB)
            results[key] = run_worker(__file__, key, spec, args.threads, rss_cap_mib=cap)
            results[key]["cap_mib"] = cap
    print(describe(results, args))
    if args.json:
        report = {
            "config": GPT2_SMALL,
            "parameters": built.get("parameters"),
            "batch": [args.batch, args.seq],
            "threads": args.threads,
            "steps": args.steps,
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

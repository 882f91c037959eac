"""The README's main job, trained both ways: examples/configs/tiny-from-scratch.toml (822,016
parameters, character tokenizer, batch 16 x 128, AdamW, cosine schedule with warmup, clipping)
with metalcandle, and the same model with transformers + torch in the plain loop a user would
write instead, eager and under torch.compile.

    python benches/train_tiny.py [--warmup 20] [--steps 40] [--threads 2] [--repeats 1]
                                 [--config examples/configs/tiny-from-scratch.toml]
                                 [--no-torch] [--no-compile] [--json out.json]

Both sides get the same batches in the same order (the config's BatchStream, as `metalcandle
train` draws them), the same learning rate at every step (the config's schedule over its
max_steps), the same initial weights and the same validation batches. metalcandle trains through
the pieces `metalcandle train` uses: its model builder, optimizer from the config and
`Trainer.step`. torch trains `LlamaForCausalLM` (RMSNorm, SwiGLU, RoPE, biases on every linear as
the custom-transformer spec has them, tied embeddings) loaded from the same safetensors, with
`torch.optim.AdamW` and `clip_grad_norm_`.

Each side runs in its own process with the thread count in its environment. The first --warmup
steps are untimed (thread pools, first-touch allocations, torch.compile's compilation); tokens/s
is over the next --steps steps, timing the step call alone as `metalcandle train` does. The
validation loss after the last step is a sanity check that both trained the same model alike.
With --repeats N the three runs repeat N times in rotating order; the table gives the median and
the minimum over repeats, and the ratios are medians of the per-repeat ratios.

PyTorch and transformers are optional; without them only metalcandle runs (--no-torch):

    pip install torch --index-url https://download.pytorch.org/whl/cpu transformers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from common import add_bench_args, format_table, minor_faults, peak_rss_mib, ratio, run_worker, serve_worker

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "examples" / "configs" / "tiny-from-scratch.toml"
MC, EAGER, COMPILE = "metalcandle", "torch eager", "torch.compile"
WORKER_OF = {MC: "mc", EAGER: "torch", COMPILE: "torch-compile"}
PIP_COMMAND = "pip install torch --index-url https://download.pytorch.org/whl/cpu transformers"


# --- preparation (in the driver) -------------------------------------------------------------------


def prepare(config: Path, n_steps: int, tmp: str) -> dict:
    """Everything both sides share, written to `tmp`: the batches and learning rates of the first
    `n_steps` steps, the validation batches, the initial weights, and a Llama config.json that
    describes the same model to transformers."""
    import numpy as np

    from metalcandle import data as D
    from metalcandle.config import load_config
    from metalcandle.loading import build_tokenizer
    from metalcandle.schedule import lr_at
    from metalcandle.train import build_model, load_datasets, total_steps, train_files

    cfg = load_config(config)
    if not cfg.from_scratch or cfg.is_lora or cfg["train"]["grad_accum"] != 1:
        sys.exit(f"{config}: this benchmark needs a from-scratch config without LoRA or grad_accum")
    spec, t, s = cfg["model"]["spec"], cfg["train"], cfg["scheduler"]
    tokenizer = build_tokenizer(cfg, None, train_files(cfg))
    data = load_datasets(cfg, tokenizer)
    max_steps = total_steps(cfg, len(data.train))
    stream = D.BatchStream(data.train, t["batch_size"], cfg["run"]["seed"])
    batches = [stream.next() for _ in range(n_steps)]
    valid = D.eval_batches(data.valid, t["batch_size"], t["eval_batches"])
    lrs = [
        lr_at(k, cfg["optimizer"]["lr"], s["name"], s["warmup_steps"], max_steps, s["min_lr_ratio"])
        for k in range(1, n_steps + 1)
    ]
    np.savez(
        os.path.join(tmp, "batches.npz"),
        ids=np.stack([b[0] for b in batches]),
        labels=np.stack([b[1] for b in batches]),
        valid_ids=np.concatenate([v[0] for v in valid]),
        valid_labels=np.concatenate([v[1] for v in valid]),
        valid_sizes=np.array([len(v[0]) for v in valid]),
    )
    model = build_model(cfg, None, tokenizer, None)
    weights = os.path.join(tmp, "weights")
    model.save_pretrained(weights)
    o = cfg["optimizer"]
    llama = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": tokenizer.vocab_size,
        "hidden_size": spec["d_model"],
        "intermediate_size": spec["d_ff"],
        "num_hidden_layers": spec["n_layers"],
        "num_attention_heads": spec["n_heads"],
        "num_key_value_heads": spec["n_kv_heads"],
        "max_position_embeddings": spec["max_seq_len"],
        "hidden_act": "silu",
        # The custom-transformer spec's defaults (crates/metalcandle-core/src/spec.rs CustomSpec):
        # biases on every linear, norm eps 1e-5, rope theta 1e4.
        "attention_bias": True,
        "mlp_bias": True,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec["tie_embeddings"],
        "attention_dropout": spec["dropout"],
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if spec["norm"] != "rmsnorm" or spec["mlp"] != "swiglu" or spec["positions"] != "rope":
        sys.exit(f"{config}: the torch side is LlamaForCausalLM, which needs rmsnorm + swiglu + rope")
    torch_dir = os.path.join(tmp, "llama")
    os.makedirs(torch_dir)
    with open(os.path.join(torch_dir, "config.json"), "w") as f:
        json.dump(llama, f, indent=2)
    os.symlink(os.path.join(weights, "model.safetensors"), os.path.join(torch_dir, "model.safetensors"))
    return {
        "config": str(config),
        "parameters": model.num_parameters(),
        "vocab_size": tokenizer.vocab_size,
        "batch": [t["batch_size"], cfg["data"]["seq_len"]],
        "schedule_max_steps": max_steps,
        "optimizer": {
            "lr": o["lr"],
            "betas": list(o["betas"]),
            "eps": o["eps"],
            "weight_decay": o["weight_decay"],
            "max_grad_norm": t["max_grad_norm"] or None,
        },
        "lrs": lrs,
        "paths": {"batches": os.path.join(tmp, "batches.npz"), "weights": weights, "torch": torch_dir},
    }


# --- workers ---------------------------------------------------------------------------------------


def load_batches(spec: dict):
    import numpy as np

    z = np.load(spec["paths"]["batches"])
    bounds = np.cumsum(z["valid_sizes"])[:-1]
    valid = list(zip(np.split(z["valid_ids"], bounds), np.split(z["valid_labels"], bounds), strict=True))
    return z["ids"], z["labels"], valid


def train_loop(spec: dict, step, evaluate) -> dict:
    """Runs warm-up + timed steps; `step(k, ids, labels)` returns the loss of step k (0-based)."""
    ids, labels, valid = load_batches(spec)
    warmup, steps = spec["warmup"], spec["steps"]
    losses, times = [], []
    first_s = faults = None
    for k in range(warmup + steps):
        if k == warmup:
            faults = minor_faults()
        t0 = time.perf_counter()
        losses.append(step(k, ids[k], labels[k]))
        dt = time.perf_counter() - t0
        first_s = dt if k == 0 else first_s
        if k >= warmup:
            times.append(dt)
    faults = minor_faults() - faults
    tokens = int(ids[0].size)
    return {
        "tokens_per_s": round(tokens * steps / sum(times), 1),
        "step_ms_median": round(1000 * statistics.median(times), 2),
        "first_step_s": round(first_s, 2),
        "minor_faults_per_step": round(faults / steps),
        "loss_first": round(losses[0], 5),
        "loss_last": round(losses[-1], 5),
        "val_loss": round(evaluate(valid), 5),
        "peak_rss_mib": peak_rss_mib(),
    }


def mc_worker(spec: dict) -> dict:
    import metalcandle as mc
    from metalcandle.config import load_config
    from metalcandle.train import evaluate, make_optimizer

    cfg = load_config(spec["config"])
    model = mc.load_model(spec["paths"]["weights"])
    opt = make_optimizer(cfg)
    trainer = mc.Trainer(model, opt, max_grad_norm=spec["optimizer"]["max_grad_norm"])

    def step(k, ids, labels):
        opt.lr = spec["lrs"][k]
        return float(trainer.step(ids, labels=labels).loss)

    result = train_loop(spec, step, lambda valid: evaluate(trainer, valid)[0])
    return {**result, "parameters": model.num_parameters(), "version": mc.__version__}


def torch_worker(spec: dict, compiled: bool) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["paths"]["torch"], dtype=torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = spec["optimizer"]
    optimizer = torch.optim.AdamW(
        params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"]
    )
    forward = torch.compile(model) if compiled else model

    def step(k, ids, labels):
        for group in optimizer.param_groups:
            group["lr"] = spec["lrs"][k]
        loss = forward(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
        loss.backward()
        if o["max_grad_norm"] is not None:
            torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def evaluate(valid):
        # Token-weighted mean over the batches, as metalcandle's evaluate() computes it.
        total, count = 0.0, 0
        model.eval()
        with torch.no_grad():
            for ids, labels in valid:
                n = int((labels[:, 1:] != -100).sum())
                loss = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
                total += float(loss) * n
                count += n
        model.train()
        return total / max(count, 1)

    result = train_loop(spec, step, evaluate)
    return {
        **result,
        "parameters": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


WORKERS = {
    "mc": mc_worker,
    "torch": lambda spec: torch_worker(spec, compiled=False),
    "torch-compile": lambda spec: torch_worker(spec, compiled=True),
}


# --- the driver ------------------------------------------------------------------------------------


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out[name] = {"error": results[-1]["error"]}
            continue
        tps = [r["tokens_per_s"] for r in ok]
        out[name] = {
            "tokens_per_s_median": round(statistics.median(tps), 1),
            "tokens_per_s_min": min(tps),
            "tokens_per_s_all": tps,
            **{k: ok[-1][k] for k in ok[-1] if k != "tokens_per_s"},
        }
    return out


def per_repeat_ratios(runs: dict[str, list[dict]], other: str) -> list[float]:
    got = []
    for a, b in zip(runs.get(MC, []), runs.get(other, []), strict=False):
        r = ratio(a.get("tokens_per_s"), b.get("tokens_per_s"))
        if r is not None:
            got.append(r)
    return got


def describe(shared: dict, summary: dict, ratios: dict, args) -> str:
    lines = [
        f"{shared['config']}: {shared['parameters']:,} parameters, vocab {shared['vocab_size']}, "
        f"batch {shared['batch'][0]} x {shared['batch'][1]}",
        f"{args.threads} threads; {args.warmup} warm-up + {args.steps} timed steps; {args.repeats} repeat(s)",
        "",
    ]
    header = ["", "tokens/s (median)", "min", "step ms", "faults/step", "loss step 1", "val loss", "peak MiB"]
    rows = [header]
    for name, s in summary.items():
        if "error" in s:
            rows.append([name, f"failed: {s['error']}"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                name,
                f"{s['tokens_per_s_median']:.0f}",
                f"{s['tokens_per_s_min']:.0f}",
                f"{s['step_ms_median']:.1f}",
                f"{s['minor_faults_per_step']}",
                f"{s['loss_first']:.4f}",
                f"{s['val_loss']:.4f}",
                f"{s['peak_rss_mib']:.0f}",
            ]
        )
    lines.append(format_table(rows))
    if ratios:
        lines.append("")
        for other, rs in ratios.items():
            if rs:
                lines.append(
                    f"metalcandle / {other}: {statistics.median(rs):.2f}x (per repeat: "
                    + ", ".join(f"{r:.2f}" for r in rs)
                    + ")"
                )
    if COMPILE in summary and "first_step_s" in summary[COMPILE]:
        lines.append(f"torch.compile's first step (compilation): {summary[COMPILE]['first_step_s']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps (default 40)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile run")
    add_bench_args(ap, WORKERS)
    args = ap.parse_args()
    if serve_worker(args, WORKERS):
        return
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        sys.exit("--warmup, --steps and --repeats must be >= 1")
    if not args.no_torch:
        common.exit_unless_installed("train_tiny", ("torch", "transformers"), PIP_COMMAND)
    names = [MC] if args.no_torch else [MC, EAGER] + ([] if args.no_compile else [COMPILE])

    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="train_tiny-") as tmp:
        shared = prepare(args.config, args.warmup + args.steps, tmp)
        spec = {
            **shared,
            "warmup": args.warmup,
            "steps": args.steps,
            "threads": args.threads,
        }
        for rep in range(args.repeats):
            print(f"repeat {rep + 1}/{args.repeats}:", file=sys.stderr)
            order = names[rep % len(names) :] + names[: rep % len(names)]  # who goes first rotates
            for name in order:
                runs[name].append(run_worker(__file__, WORKER_OF[name], spec, args.threads))
    summary = summarize(runs)
    ratios = {other: per_repeat_ratios(runs, other) for other in names if other != MC}
    print(describe(shared, summary, ratios, args))
    if args.json:
        report = {
            "shared": {k: v for k, v in shared.items() if k not in ("paths", "lrs")},
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "summary": summary,
            "ratios_per_repeat": ratios,
            "raw": runs,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = [n for n, s in summary.items() if "error" in s]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

"""metalcandle next to PyTorch (transformers + peft) on the CPU: the same randomly initialised
Qwen2.5-0.5B-shaped model in float32, the same input ids and the same number of threads.

  prefill   forward of [1, 256] tokens without gradients, tokens/s
  decode    greedy decoding of 64 new tokens after a 16-token prompt with the KV cache, tokens/s
            (prompt prefill included; neither framework may stop early)
  lora      one LoRA step (r=8, alpha=16 on q/k/v/o/gate/up/down, AdamW, grad-norm clip 1.0)
            on [1, 256], tokens/s
  full      one full fine-tuning step (AdamW, clip 1.0) of a 25.3M-parameter Qwen2-family model
            on [1, 256], tokens/s
  rss       peak resident memory (ru_maxrss) of the lora and the full step
  roofline  the machine's f32 matmul rate and memory read rate, and each result above as the
            fraction it achieves of the one that bounds it

    python benches/compare_torch.py [--runs 3] [--layers N] [--threads N] [--json out.json]
                                    [--only prefill,decode,lora,full,rss,roofline] [--no-torch]

PyTorch, transformers and peft are optional; without them the script says how to install them,
or runs metalcandle alone with --no-torch:

    pip install torch --index-url https://download.pytorch.org/whl/cpu transformers peft

The weights are made once by transformers (Qwen2ForCausalLM, torch.manual_seed(0)), saved as
safetensors to a temporary folder that both frameworks load, and deleted at the end. Every
measurement runs in a fresh process with the thread count in its environment, so the thread pools
(rayon for metalcandle, torch's intra-op pool, BLAS) and the peak RSS belong to that one
measurement. Each timing is one warm-up call and then --runs timed calls; the table gives medians,
and ratios are metalcandle / torch (above 1: metalcandle is faster; for memory, below 1: smaller).
--layers shrinks only the Qwen2.5-0.5B-shaped model, for a quick check.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import time

from common import (  # noqa: E402
    QWEN25_05B,
    add_bench_args,
    current_rss_mib,
    exit_unless_installed,
    format_table,
    peak_rss_mib,
    ratio,
    run_worker,
    serve_worker,
    timed,
    torch_train_step,
    write_report,
)

# Same family at a size where a full AdamW step is routine on a laptop: head_dim 64 as in the
# real model, 4x MLP; 25,272,960 parameters, more than half of them the tied embedding.
SMALL_QWEN2 = {
    **QWEN25_05B,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 8, 16
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0
SEQ = 256
PROMPT_TOKENS, NEW_TOKENS = 16, 64
SEED = 0
MATMUL_N = 2048
READ_BYTES = 2**30
MACHINE_REPS = 5

SECTIONS = ("prefill", "decode", "lora", "full", "rss", "roofline")
PIP_COMMAND = "pip install torch --index-url https://download.pytorch.org/whl/cpu transformers peft"
MC, TORCH = "metalcandle", "torch"


# --- model arithmetic --------------------------------------------------------------------------------


def qwen2_parameters(cfg: dict) -> int:
    """Unique parameters of a Qwen2 model (q/k/v carry biases, o and the MLP do not)."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if cfg["tie_word_embeddings"] else 2)
    return embeddings + cfg["num_hidden_layers"] * layer + h


def lora_parameters(cfg: dict) -> int:
    """r x (in + out) per adapted linear."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    dims = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(LORA_R * (dims[t][0] + dims[t][1]) for t in LORA_TARGETS)
    return cfg["num_hidden_layers"] * per_layer


def base_config(layers: int | None) -> dict:
    cfg = dict(QWEN25_05B)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    return cfg


# --- measurement helpers (run inside the workers) ----------------------------------------------------


def summary(times: list[float], tokens: int, rss_ready: float | None, **extra) -> dict:
    median = statistics.median(times)
    return {
        "times_s": [round(t, 4) for t in times],
        "median_s": round(median, 4),
        "tokens_per_s": round(tokens / median, 2),
        "rss_ready_mib": rss_ready,
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }


def input_ids(vocab: int, length: int):
    import numpy as np

    return np.random.default_rng(SEED).integers(0, vocab, size=(1, length), dtype=np.int64)


# --- metalcandle workers -----------------------------------------------------------------------------


def mc_build(spec: dict) -> dict:
    """Without torch the weights come from metalcandle's own initialisation instead."""
    import metalcandle as mc

    counts = {}
    for name, item in spec["models"].items():
        model = mc.Model.from_config(item["config"], seed=SEED)
        model.save_pretrained(item["path"])
        counts[name] = model.num_parameters()
    return {"parameters": counts, "weights_from": "metalcandle Model.from_config(seed=0)"}


def mc_prefill(spec: dict) -> dict:
    import metalcandle as mc

    model = mc.load_model(spec["path"])
    ids = input_ids(model.vocab_size, SEQ)
    rss = current_rss_mib()
    times, logits = timed(lambda: model.forward(ids), spec["runs"])
    return summary(
        times, SEQ, rss, parameters=model.num_parameters(), probe=logits[0, -1, :8].astype(float).tolist()
    )


def mc_prompt(spec: dict) -> dict:
    """A prompt as generation processes it: SEQ ids into a fresh KV cache and one token from the
    last position's logits (llama-bench's prompt-processing test does the same work)."""
    import metalcandle as mc

    model = mc.load_model(spec["path"])
    ids = input_ids(model.vocab_size, SEQ)
    rss = current_rss_mib()
    times, out = timed(lambda: model.generate(ids, max_new_tokens=1, eos_token_id=[]), spec["runs"])
    return summary(times, SEQ, rss, parameters=model.num_parameters(), new_ids=out[0, SEQ:].tolist())


def mc_decode(spec: dict) -> dict:
    import metalcandle as mc

    model = mc.load_model(spec["path"])
    prompt = input_ids(model.vocab_size, PROMPT_TOKENS)
    rss = current_rss_mib()
    # eos_token_id=[] turns stopping off, so every run decodes exactly NEW_TOKENS tokens.
    times, out = timed(
        lambda: model.generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[]), spec["runs"]
    )
    if out.shape != (1, PROMPT_TOKENS + NEW_TOKENS):
        raise RuntimeError(f"generate returned shape {out.shape}, expected {(1, PROMPT_TOKENS + NEW_TOKENS)}")
    return summary(
        times, NEW_TOKENS, rss, parameters=model.num_parameters(), new_ids=out[0, PROMPT_TOKENS:].tolist()
    )


def mc_train(spec: dict, lora: bool) -> dict:
    import metalcandle as mc

    model = mc.load_model(spec["path"])
    parameters = model.num_parameters()
    if lora:
        model.add_lora(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS, seed=SEED)
    trainable = sum(int(v.size) for v in model.trainable_parameters().values())
    trainer = mc.Trainer(model, mc.AdamW(lr=LR, weight_decay=WEIGHT_DECAY), max_grad_norm=MAX_GRAD_NORM)
    ids = input_ids(model.vocab_size, SEQ)
    rss = current_rss_mib()
    losses = []

    def step():
        losses.append(trainer.step(ids).loss)

    times, _ = timed(step, spec["runs"])
    return summary(
        times, SEQ, rss, parameters=parameters, trainable=trainable, losses=[round(x, 5) for x in losses]
    )


# --- torch workers -----------------------------------------------------------------------------------


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _torch_load(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def torch_build(spec: dict) -> dict:
    torch = _torch(spec["threads"])
    import transformers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    counts = {}
    for name, item in spec["models"].items():
        cfg = {k: v for k, v in item["config"].items() if k != "model_type"}
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(torch.float32)
        model.save_pretrained(item["path"])
        if not any(f.endswith(".safetensors") for f in os.listdir(item["path"])):
            raise RuntimeError(f"save_pretrained wrote no safetensors file to {item['path']}")
        counts[name] = sum(p.numel() for p in model.parameters())
    return {
        "parameters": counts,
        "weights_from": f"transformers {transformers.__version__} Qwen2ForCausalLM, torch.manual_seed(0)",
    }


def torch_prefill(spec: dict) -> dict:
    torch = _torch(spec["threads"])
    model = _torch_load(spec["path"]).eval()
    ids = torch.from_numpy(input_ids(model.config.vocab_size, SEQ))
    rss = current_rss_mib()

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False).logits

    times, logits = timed(forward, spec["runs"])
    return summary(
        times,
        SEQ,
        rss,
        parameters=sum(p.numel() for p in model.parameters()),
        probe=logits[0, -1, :8].double().tolist(),
        attn_implementation=model.config._attn_implementation,
    )


def torch_decode(spec: dict) -> dict:
    torch = _torch(spec["threads"])
    model = _torch_load(spec["path"]).eval()
    prompt = torch.from_numpy(input_ids(model.config.vocab_size, PROMPT_TOKENS))
    mask = torch.ones_like(prompt)
    rss = current_rss_mib()

    # torch's side is timed through transformers' own generate, the baseline, not through any
    # code shared with metalcandle.
    def generate():
        with torch.inference_mode():
            return model.generate(
                prompt,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )

    times, out = timed(generate, spec["runs"])
    if tuple(out.shape) != (1, PROMPT_TOKENS + NEW_TOKENS):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
    return summary(
        times,
        NEW_TOKENS,
        rss,
        parameters=sum(p.numel() for p in model.parameters()),
        new_ids=out[0, PROMPT_TOKENS:].tolist(),
    )


def torch_train(spec: dict, lora: bool) -> dict:
    torch = _torch(spec["threads"])
    model = _torch_load(spec["path"])
    parameters = sum(p.numel() for p in model.parameters())
    ids = torch.from_numpy(input_ids(model.config.vocab_size, SEQ))
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_R,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model.train()
    step = torch_train_step(model, ids, LR, WEIGHT_DECAY, MAX_GRAD_NORM)
    rss = current_rss_mib()
    losses = []
    times, _ = timed(lambda: losses.append(step()), spec["runs"])
    return summary(
        times,
        SEQ,
        rss,
        parameters=parameters,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        losses=[round(x, 5) for x in losses],
    )


# --- machine limits ----------------------------------------------------------------------------------


def _best_rate(fn, work: float, reps: int) -> float:
    """Work per second of the fastest of `reps` calls after a warm-up: the machine's limit, so the
    best observation is the estimate least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return work / best


def _numpy_matmul_gflops() -> float:
    import numpy as np

    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    c = np.empty_like(a)
    return _best_rate(lambda: np.matmul(a, b, out=c), 2 * MATMUL_N**3, MACHINE_REPS) / 1e9


def _numpy_read_gbps(threads: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    # Filled with ones, not np.empty: untouched pages all map the zero page and would read from cache.
    data = np.ones(READ_BYTES // 4, dtype=np.float32)
    chunks = np.array_split(data, threads)
    # np.sum is single-threaded; reductions release the GIL, so one thread per chunk reads in parallel.
    with ThreadPoolExecutor(threads) as pool:
        return _best_rate(lambda: list(pool.map(np.sum, chunks)), data.nbytes, MACHINE_REPS) / 1e9


def numpy_machine(spec: dict) -> dict:
    import numpy as np

    return {
        "matmul_gflops": round(_numpy_matmul_gflops(), 1),
        "read_gbps": round(_numpy_read_gbps(spec["threads"]), 2),
        "numpy": np.__version__,
        "peak_rss_mib": peak_rss_mib(),
    }


def _torch_matmul_gflops(torch) -> float:
    torch.manual_seed(SEED)
    a = torch.randn(MATMUL_N, MATMUL_N)
    b = torch.randn(MATMUL_N, MATMUL_N)
    c = torch.empty_like(a)
    return _best_rate(lambda: torch.mm(a, b, out=c), 2 * MATMUL_N**3, MACHINE_REPS) / 1e9


def _torch_read_gbps(torch) -> float:
    data = torch.ones(READ_BYTES // 4, dtype=torch.float32)
    return _best_rate(lambda: data.sum(), data.numel() * 4, MACHINE_REPS) / 1e9


def torch_machine(spec: dict) -> dict:
    torch = _torch(spec["threads"])
    return {
        "matmul_gflops": round(_torch_matmul_gflops(torch), 1),
        "read_gbps": round(_torch_read_gbps(torch), 2),
        "torch": torch.__version__,
        "peak_rss_mib": peak_rss_mib(),
    }


WORKERS = {
    f"{MC}:build": mc_build,
    f"{MC}:prefill": mc_prefill,
    f"{MC}:prompt": mc_prompt,
    f"{MC}:decode": mc_decode,
    f"{MC}:lora": lambda spec: mc_train(spec, lora=True),
    f"{MC}:full": lambda spec: mc_train(spec, lora=False),
    f"{TORCH}:build": torch_build,
    f"{TORCH}:prefill": torch_prefill,
    f"{TORCH}:decode": torch_decode,
    f"{TORCH}:lora": lambda spec: torch_train(spec, lora=True),
    f"{TORCH}:full": lambda spec: torch_train(spec, lora=False),
    f"{TORCH}:machine": torch_machine,
    "numpy:machine": numpy_machine,
}


def import_framework(worker: str) -> float | None:
    """RSS once the libraries are imported and before any model exists, so the JSON can tell the
    libraries' own footprint apart from what the measurement allocates."""
    framework, task = worker.split(":")
    if framework == MC:
        import metalcandle  # noqa: F401
    elif framework == TORCH:
        import torch  # noqa: F401

        if task != "machine":
            import transformers  # noqa: F401
        if task == "lora":
            import peft  # noqa: F401
    else:
        import numpy  # noqa: F401
    return current_rss_mib()


# --- the driver --------------------------------------------------------------------------------------


def parse_only(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        sys.exit(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return chosen


def build_report(args, threads, frameworks, cfgs, built, runs, machine) -> dict:
    n_base = qwen2_parameters(cfgs["base"])
    n_small = qwen2_parameters(cfgs["small"])
    n_lora = lora_parameters(cfgs["base"])
    flops_per_token = {
        "prefill": 2 * n_base,
        "lora": 4 * n_base + 6 * n_lora,
        "full": 6 * n_small,
    }
    bytes_per_token = {"decode": 4 * n_base}
    limits = {}
    if machine:
        valid = [m for m in machine.values() if "error" not in m]
        if valid:
            limits = {
                "matmul_gflops": max(m["matmul_gflops"] for m in valid),
                "read_gbps": max(m["read_gbps"] for m in valid),
            }

    metrics = {}
    labels = {
        "prefill": f"prefill [1, {SEQ}], tokens/s",
        "decode": f"decode {NEW_TOKENS} after {PROMPT_TOKENS}, tokens/s",
        "lora": f"LoRA step [1, {SEQ}], tokens/s",
        "full": f"full step {n_small / 1e6:.1f}M [1, {SEQ}], tokens/s",
    }
    for task, label in labels.items():
        if task not in runs or task not in args.sections:
            continue
        entry = {"label": label, "unit": "tokens/s"}
        for fw in frameworks:
            r = runs[task].get(fw, {})
            entry[fw] = r.get("tokens_per_s")
            if limits and entry[fw] is not None:
                if task in flops_per_token:
                    achieved = flops_per_token[task] * entry[fw] / 1e9
                    entry[f"{fw}_achieved_gflops"] = round(achieved, 2)
                    entry[f"{fw}_fraction_of_limit"] = round(achieved / limits["matmul_gflops"], 4)
                else:
                    achieved = bytes_per_token[task] * entry[fw] / 1e9
                    entry[f"{fw}_achieved_gbps"] = round(achieved, 3)
                    entry[f"{fw}_fraction_of_limit"] = round(achieved / limits["read_gbps"], 4)
        entry["ratio"] = ratio(entry.get(MC), entry.get(TORCH))
        metrics[task] = entry
    if "rss" in args.sections:
        for task in ("lora", "full"):
            if task not in runs:
                continue
            what = "LoRA step" if task == "lora" else f"full step {n_small / 1e6:.1f}M"
            entry = {"label": f"peak RSS {what}, MiB", "unit": "MiB"}
            for fw in frameworks:
                entry[fw] = runs[task].get(fw, {}).get("peak_rss_mib")
            entry["ratio"] = ratio(entry.get(MC), entry.get(TORCH))
            metrics[f"rss_{task}"] = entry

    return {
        "model": (
            f"Qwen2.5-0.5B-shaped, random weights, float32, {cfgs['base']['num_hidden_layers']} layer(s), "
            f"{n_base:,} parameters"
        ),
        "small_model": f"Qwen2-family, random weights, float32, {n_small:,} parameters",
        "configs": cfgs,
        "parameters": {"base": n_base, "small": n_small, "lora_adapter": n_lora},
        "weights_from": built.get("weights_from"),
        "threads": threads,
        "runs": args.runs,
        "statistic": "median of the timed runs, after one warm-up call each",
        "ratio": "metalcandle / torch",
        "machine": {"measured": machine, "limits": limits, "statistic": f"best of {MACHINE_REPS}"},
        "formulas": {
            "prefill": f"FLOPs/token = 2 x N = 2 x {n_base:,} (attention scores excluded)",
            "lora": (
                f"FLOPs/token = 4 x N (forward + input gradient through the frozen weights) + 6 x N_lora "
                f"(adapter forward, input and weight gradients) = 4 x {n_base:,} + 6 x {n_lora:,}"
            ),
            "full": f"FLOPs/token = 6 x N = 6 x {n_small:,}",
            "decode": f"bytes/token = 4 x N = 4 x {n_base:,} (every f32 weight read once; KV cache excluded)",
            "fraction_of_limit": (
                "FLOPs/token x tokens/s / f32 matmul rate (prefill, lora, full); "
                "bytes/token x tokens/s / memory read rate (decode); limits = best of numpy and torch"
            ),
        },
        "metrics": metrics,
        "checks": {**checks(runs), **count_check(built, {"base": n_base, "small": n_small})},
        "raw": runs,
        "versions": versions(),
    }


def versions() -> dict:
    found = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("metalcandle", "numpy", "torch", "transformers", "peft"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def count_check(built: dict, expected: dict) -> dict:
    """The FLOP and byte formulas use the counts computed here; flag any model they do not describe."""
    wrong = {
        name: {"built": n, "formula": expected[name]}
        for name, n in built.get("parameters", {}).items()
        if n != expected[name]
    }
    return {"parameter_count_mismatch": wrong} if wrong else {}


def checks(runs: dict) -> dict:
    """Evidence that both frameworks ran the same model on the same ids."""
    out = {}
    pair = runs.get("prefill", {})
    if "probe" in pair.get(MC, {}) and "probe" in pair.get(TORCH, {}):
        diff = max(abs(a - b) for a, b in zip(pair[MC]["probe"], pair[TORCH]["probe"], strict=True))
        out["prefill_max_abs_logit_diff"] = float(f"{diff:.3g}")
    pair = runs.get("decode", {})
    if "new_ids" in pair.get(MC, {}) and "new_ids" in pair.get(TORCH, {}):
        a, b = pair[MC]["new_ids"], pair[TORCH]["new_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        out["decode_identical_prefix"] = f"{same}/{len(a)}"
    for task in ("lora", "full"):
        pair = runs.get(task, {})
        if pair.get(MC, {}).get("losses") and pair.get(TORCH, {}).get("losses"):
            out[f"{task}_first_loss"] = {MC: pair[MC]["losses"][0], TORCH: pair[TORCH]["losses"][0]}
            out[f"{task}_trainable"] = {MC: pair[MC]["trainable"], TORCH: pair[TORCH]["trainable"]}
    return out


def _fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if unit == "MiB" else f"{value:.2f}"


def table(report: dict, frameworks: list[str]) -> str:
    header = ["metric", *frameworks]
    if TORCH in frameworks:
        header.append("ratio mc/torch")
    with_limits = bool(report["machine"]["limits"])
    if with_limits:
        header += [f"{'mc' if fw == MC else fw} of limit" for fw in frameworks]
    rows = [header]
    for entry in report["metrics"].values():
        row = [entry["label"], *(_fmt(entry[fw], entry["unit"]) for fw in frameworks)]
        if TORCH in frameworks:
            row.append("-" if entry["ratio"] is None else f"{entry['ratio']:.2f}x")
        if with_limits:
            for fw in frameworks:
                frac = entry.get(f"{fw}_fraction_of_limit")
                row.append("" if frac is None else f"{100 * frac:.1f}%")
        rows.append(row)
    return format_table(rows)


def describe(report: dict, frameworks: list[str]) -> str:
    head = report["model"]
    if any(k in report["metrics"] for k in ("full", "rss_full")):
        head += f"; full step: {report['small_model']}"
    lines = [
        head,
        f"{report['threads']} threads, median of {report['runs']} runs; ratio = metalcandle / torch "
        "(tokens/s: above 1 is faster; RSS: below 1 is smaller)",
        "",
        table(report, frameworks),
    ]
    machine = report["machine"]
    if machine["measured"]:
        lines.append("")
        parts = []
        for source, m in machine["measured"].items():
            if "error" in m:
                parts.append(f"{source}: failed ({m['error']})")
            else:
                parts.append(f"{source}: {m['matmul_gflops']} GFLOP/s matmul, {m['read_gbps']} GB/s read")
        lines.append(
            f"machine ({MATMUL_N}^2 f32 matmul, {READ_BYTES >> 30} GiB read, best of {MACHINE_REPS}): "
            + "; ".join(parts)
        )
        if machine["limits"]:
            lim = machine["limits"]
            lines.append(f"limits used: {lim['matmul_gflops']} GFLOP/s, {lim['read_gbps']} GB/s")
            for task in ("prefill", "decode", "lora", "full"):
                if task in report["metrics"]:
                    lines.append(f"  {task}: {report['formulas'][task]}")
    if report["checks"]:
        lines += ["", "same model, same ids? " + describe_checks(report["checks"])]
    return "\n".join(lines)


def describe_checks(found: dict) -> str:
    parts = []
    if "prefill_max_abs_logit_diff" in found:
        parts.append(f"prefill logits max |diff| {found['prefill_max_abs_logit_diff']:.3g}")
    if "decode_identical_prefix" in found:
        parts.append(f"greedy tokens identical for {found['decode_identical_prefix']}")
    for task, name in (("lora", "LoRA"), ("full", "full")):
        if f"{task}_first_loss" in found:
            loss, trainable = found[f"{task}_first_loss"], found[f"{task}_trainable"]
            parts.append(
                f"{name} first loss {loss[MC]:.5f} vs {loss[TORCH]:.5f}, "
                f"trainable {trainable[MC]:,} vs {trainable[TORCH]:,}"
            )
    if "parameter_count_mismatch" in found:
        parts.append(f"PARAMETER COUNTS DIFFER FROM THE FORMULA: {found['parameter_count_mismatch']}")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="timed calls per measurement, after one warm-up")
    ap.add_argument("--layers", type=int, help="decoder layers of the 0.5B-shaped model (default 24)")
    ap.add_argument("--threads", type=int, help="threads for both frameworks (default: os.cpu_count())")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    add_bench_args(ap, WORKERS)
    args = ap.parse_args()
    if serve_worker(args, WORKERS, first=lambda name: {"rss_after_import_mib": import_framework(name)}):
        return
    if args.runs < 1:
        sys.exit("--runs must be >= 1")
    args.sections = parse_only(args.only)
    if not args.no_torch:
        exit_unless_installed("compare_torch", ("torch", "transformers", "peft"), PIP_COMMAND)
    threads = args.threads or os.cpu_count() or 1
    frameworks = [MC] if args.no_torch else [MC, TORCH]
    cfgs = {"base": base_config(args.layers), "small": dict(SMALL_QWEN2)}
    tasks = [t for t in ("prefill", "decode", "lora", "full") if t in args.sections]
    if "rss" in args.sections:
        tasks += [t for t in ("lora", "full") if t not in tasks]
    needed = {"small" if t == "full" else "base" for t in tasks}

    runs: dict = {}
    machine: dict = {}
    built: dict = {}
    with tempfile.TemporaryDirectory(prefix="compare_torch-") as tmp:
        paths = {name: os.path.join(tmp, name) for name in needed}
        if needed:
            print(f"building the random models in {tmp}", file=sys.stderr)
            spec = {"models": {n: {"config": cfgs[n], "path": paths[n]} for n in needed}, "threads": threads}
            built = run_worker(__file__, f"{frameworks[-1]}:build", spec, threads)
            if "error" in built:
                sys.exit("could not build the models")
        for task in tasks:
            print(f"{task}:", file=sys.stderr)
            path = paths["small" if task == "full" else "base"]
            spec = {"path": path, "runs": args.runs, "threads": threads}
            runs[task] = {fw: run_worker(__file__, f"{fw}:{task}", spec, threads) for fw in frameworks}
    if "roofline" in args.sections:
        print("machine limits:", file=sys.stderr)
        machine["numpy"] = run_worker(__file__, "numpy:machine", {"threads": threads}, threads)
        if not args.no_torch:
            machine[TORCH] = run_worker(__file__, f"{TORCH}:machine", {"threads": threads}, threads)

    report = build_report(args, threads, frameworks, cfgs, built, runs, machine)
    print(describe(report, frameworks))
    write_report(args.json, report)
    failed = [f"{t}/{fw}" for t, pair in runs.items() for fw, r in pair.items() if "error" in r]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

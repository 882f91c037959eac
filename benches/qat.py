"""Quantization-aware training against post-training quantization, on the README's main job.

    python benches/qat.py [--format q4_0] [--extra-steps 200] [--models tiny,wide] [--json out.json]

For each model: train it from scratch as `metalcandle train` does (the config's full schedule), then
continue from that checkpoint for --extra-steps more steps four ways, with the same batches in the
same order: full fine-tuning in float, full fine-tuning with QAT, a LoRA adapter (r 8, every
linear) in float, and the same adapter with QAT. Each float arm is then quantized (post-training
quantization, PTQ) and each QAT arm is quantized the same way; every model is scored on the same
validation windows, the quantized ones through the quantized kernels a deployed model runs.

    recovered = (PTQ loss - QAT loss) / (PTQ loss - float loss)

is the fraction of the quantization gap QAT wins back after the same extra steps (1 = QAT's
quantized model is as good as float; 0 = no better than PTQ).

Models: "tiny" is examples/configs/tiny-from-scratch.toml as it is (822,016 parameters); "wide" is
the same config at d_model 256, 6 layers, 8 heads, d_ff 704 (4.9M parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import format_table

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny-from-scratch.toml"
MODELS = {
    "tiny": [],
    "wide": [
        f"model.spec.{k}={v}"
        for k, v in {"d_model": 256, "n_layers": 6, "n_heads": 8, "n_kv_heads": 8, "d_ff": 704}.items()
    ],
}
ARMS = [("full", False), ("full", True), ("lora", False), ("lora", True)]
ARM_NAMES = [f"{mode}-{'qat' if qat else 'float'}" for mode, qat in ARMS]
LR = {"full": 1e-4, "lora": 1e-3}  # full: a third of the schedule's final rate; LoRA: a usual adapter rate


def train_base(name: str, overrides: list[str], work: Path) -> tuple[Path, object]:
    """The model trained from scratch by the config's own run; (final checkpoint, resolved config)."""
    from metalcandle.config import load_config
    from metalcandle.train import train

    sets = overrides + [
        f'run.output_dir="{work / name}"',
        f'run.models_dir="{work / "models"}"',
        f'run.name="qat-{name}"',
    ]
    cfg = load_config(CONFIG, sets)
    # The run's own report and evaluation samples; a finished run in --work is reused as it is.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = train(cfg, progress=False, log=lambda _: None)
    return result.final_dir, cfg


def continue_arm(checkpoint: Path, cfg, mode: str, qat: bool, fmt: str, steps: int) -> dict:
    """`steps` more steps from `checkpoint` in one arm; the float and quantized validation losses."""
    import metalcandle as mc
    from metalcandle import data as D
    from metalcandle.tokenizers import load_tokenizer
    from metalcandle.train import evaluate, load_datasets

    model = mc.load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    data = load_datasets(cfg, tokenizer)
    t = cfg["train"]
    valid = D.eval_batches(data.valid, t["batch_size"], 16)
    if mode == "lora":
        model.add_lora(r=8, alpha=16, target_modules="all-linear", seed=0)
    if qat:
        mc.enable_qat(model, fmt)
    trainer = mc.Trainer(model, mc.AdamW(lr=LR[mode], weight_decay=0.0), max_grad_norm=1.0)
    stream = D.BatchStream(data.train, t["batch_size"], seed=1)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(*stream.next())
    seconds = time.perf_counter() - start
    mc.disable_qat(model)
    float_loss = evaluate(trainer, valid)[0]
    if mode == "lora":
        model.merge_adapter()
        model.remove_adapter()
    mc.quantize_model(model, fmt)
    quantized_loss = evaluate(mc.Trainer(model, mc.SGD()), valid)[0]
    return {"float": float_loss, "quantized": quantized_loss, "seconds": seconds}


def base_losses(checkpoint: Path, cfg, fmt: str) -> dict:
    return continue_arm(checkpoint, cfg, "full", False, fmt, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="q4_0")
    ap.add_argument("--extra-steps", type=int, default=200)
    ap.add_argument("--models", default="tiny,wide")
    ap.add_argument("--arms", default=",".join(ARM_NAMES), help="a subset of " + ", ".join(ARM_NAMES))
    ap.add_argument("--lr-full", type=float, default=LR["full"])
    ap.add_argument("--lr-lora", type=float, default=LR["lora"])
    ap.add_argument("--work", type=Path, help="keep the trained models here (reused when run again)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    LR.update(full=args.lr_full, lora=args.lr_lora)
    import warnings

    warnings.simplefilter("ignore")  # matrices a format cannot take stay float; the report says so
    results = {}
    with tempfile.TemporaryDirectory(prefix="metalcandle-qat-") as tmp:
        work = args.work or Path(tmp)
        for name in args.models.split(","):
            t0 = time.perf_counter()
            checkpoint, cfg = train_base(name, MODELS[name], work)
            print(f"{name}: trained from scratch in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            r = {"base": base_losses(checkpoint, cfg, args.format)}
            for (mode, qat), key in zip(ARMS, ARM_NAMES, strict=True):
                if key not in args.arms.split(","):
                    continue
                r[key] = continue_arm(checkpoint, cfg, mode, qat, args.format, args.extra_steps)
                print(f"{name} {key}: {r[key]}", file=sys.stderr)
            results[name] = r

    fmt = args.format
    rows = [["model", "training", "float", f"PTQ {fmt}", f"QAT {fmt}", "gap recovered"]]
    for name, r in results.items():
        b = r["base"]
        rows.append([name, "from scratch (base)", f"{b['float']:.4f}", f"{b['quantized']:.4f}", "", ""])
        for mode in ("full", "lora"):
            if f"{mode}-float" not in r or f"{mode}-qat" not in r:
                continue
            f, q = r[f"{mode}-float"], r[f"{mode}-qat"]
            gap = f["quantized"] - f["float"]
            recovered = (f["quantized"] - q["quantized"]) / gap if gap > 0 else float("nan")
            r[f"{mode}-recovered"] = recovered
            rows.append(
                [
                    name,
                    f"+{args.extra_steps} steps, {mode}",
                    f"{f['float']:.4f}",
                    f"{f['quantized']:.4f}",
                    f"{q['quantized']:.4f}",
                    f"{100 * recovered:.0f}%",
                ]
            )
    print(
        f"validation loss (nats/char), {args.extra_steps} extra steps, threads "
        f"{os.environ.get('RAYON_NUM_THREADS', 'all')}"
    )
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

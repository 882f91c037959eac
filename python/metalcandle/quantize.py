"""Post-training quantization and quantization-aware training: every linear layer (attention, MLP,
LM head) and the token embedding into llama.cpp's block formats (q8_0, q4_0, ...), computed by the
Rust core. These functions are the Python face of the core's quantization, so they call
`Model._core` directly; nothing outside this module does for quantization.

    model = mc.load_model("tiny-qwen2")
    mc.quantize_model(model, "q8_0")           # in place; returns the model
    model.quantization_info()["layers"]        # format, bits per weight, shape, bytes of each matrix
    model.save_gguf("model.gguf", tokenizer)   # loads back with mc.load_model("model.gguf")

Mixed precision comes from a calibration plan (`prepare_model_for_quantization`) or a dict of
module names / glob patterns to formats. Quantization-aware training trains through the rounding:

    mc.enable_qat(model, "q4_0")               # each training step sees the q4_0-rounded weights
    ...                                        # train as usual (Trainer, train_model, metalcandle train)
    mc.quantize_model(model, "q4_0")           # then quantize as usual"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metalcandle import _core
from metalcandle.errors import UserError
from metalcandle.hooks import glob_match
from metalcandle.model import Model, as_ids

# llama.cpp's names, fewest bits first; storage bits per weight include the per-block scales (and mins).
BITS_PER_WEIGHT = dict(sorted(_core.quant_formats(), key=lambda f: f[1]))
FORMATS = tuple(BITS_PER_WEIGHT)
# Formats that keep a matrix in float when used in a plan or a {module: format} dict.
FLOAT_FORMATS = ("f32", "float", "none")

NOT_SELECTED = "not selected"


def _check_model(model) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"expected a metalcandle Model, got {type(model).__name__}")
    return model


def _format_name(fmt: str, what: str) -> str:
    name = str(fmt).lower()
    if name not in FORMATS and name not in FLOAT_FORMATS:
        raise ValueError(
            f"{what}: unknown quantization format {fmt!r} (expected one of: {', '.join(FORMATS)}, or f32)"
        )
    return name


@dataclass
class QuantizationPlan:
    """Per-layer formats chosen by `prepare_model_for_quantization`, with the calibration statistics
    behind each choice. Edit `formats` freely before passing the plan to `quantize_model`."""

    formats: dict[str, str]
    """module name -> format ("f32" keeps the matrix in float)."""
    stats: dict[str, dict] = field(default_factory=dict)
    """module name -> {"rows", "input_absmax", "input_rms", "errors": {format: relative error or None}}."""
    candidates: tuple[str, ...] = ()
    tolerance: float | None = None

    def counts(self) -> dict[str, int]:
        """How many layers each format was chosen for."""
        return dict(sorted(Counter(self.formats.values()).items()))

    def summary(self) -> str:
        head = f"quantization plan: {len(self.formats)} layers"
        if self.candidates:
            head += f", candidates {', '.join(self.candidates)}"
        if self.tolerance is not None:
            head += f", tolerance {self.tolerance:g}"
        lines = [head, "  " + ", ".join(f"{fmt}: {n}" for fmt, n in self.counts().items())]
        width = max((len(n) for n in self.formats), default=0)
        for name, fmt in self.formats.items():
            s = self.stats.get(name, {})
            err = (s.get("errors") or {}).get(fmt)
            detail = f"error {err:.4f}" if err is not None else "float"
            if s.get("rows"):
                detail += f"  input absmax {s['input_absmax']:.3g} rms {s['input_rms']:.3g}"
            lines.append(f"  {name.ljust(width)}  {fmt:5}  {detail}")
        return "\n".join(lines)

    __str__ = summary

    def to_dict(self) -> dict:
        return {
            "formats": dict(self.formats),
            "stats": self.stats,
            "candidates": list(self.candidates),
            "tolerance": self.tolerance,
        }


def _batches(batches) -> list[np.ndarray]:
    """The calibration inputs as int64 [B, T] arrays: one 2-D array, a 3-D array (batches along axis
    0), or an iterable of batches, each an array-like [B, T] or an (input_ids, labels) pair."""
    if isinstance(batches, np.ndarray):
        if batches.ndim == 3:
            return [as_ids("batches[i]", b) for b in batches]
        return [as_ids("batches", batches)]
    out = []
    for i, b in enumerate(batches):
        if isinstance(b, tuple):
            b = b[0]
        out.append(as_ids(f"batches[{i}]", b))
    if not out:
        raise ValueError("prepare_model_for_quantization needs at least one batch of input ids")
    return out


def prepare_model_for_quantization(
    model: Model,
    batches,
    candidates: Sequence[str] = ("q4_0", "q5_0", "q8_0"),
    tolerance: float = 0.05,
    skip: Iterable[str] = (),
    qat: bool = False,
) -> QuantizationPlan:
    """Chooses a quantization format for each matrix from how it behaves on sample inputs.

    What it does, exactly:
      1. Runs the float model forward on each batch of `batches` (int64 ids [B, T]; a 3-D array or a
         list of batches, (input_ids, labels) pairs accepted) with no cache, no mask and no gradient.
      2. Records for every linear layer, and for the LM head (the tied token embedding when the
         head is tied), the inputs it received: row count, max |x|, RMS of x, and up to 128 input
         rows spread over the batches.
      3. For every candidate format, quantizes the weight W and measures the relative output error
         ||X W^T - X Q(W)^T|| / ||X W^T|| (Frobenius norms) on those rows with the quantized kernel
         itself, so the 8-bit rounding of the activations that inference applies is included. An
         untied token embedding, used only as a lookup table, is measured on its table instead:
         ||Q(E) - E|| / ||E||. A format whose block size does not divide the input size is skipped.
      4. Picks, per matrix, the candidate with the fewest bits per weight whose error is at most
         `tolerance`; if none is, the most precise candidate that fits; if none fits, "f32".
         Modules matching a glob in `skip` are set to "f32".

    The model's weights are not changed. Pass the returned plan to `quantize_model(model, plan)` for
    post-training quantization; with `qat=True` the plan's formats are also what quantization-aware
    training rounds to from now on (`enable_qat(model, plan)`), before the same `quantize_model` call
    at the end. The model must be in float (not already quantized)."""
    _check_model(model)
    if model.is_quantized:
        raise ValueError("the model is already quantized; calibrate the float model (dequantize_model first)")
    if isinstance(candidates, str):
        candidates = [candidates]
    names = [_format_name(c, "candidates") for c in candidates]
    if not names or any(n in FLOAT_FORMATS for n in names):
        raise ValueError(
            f"candidates must be quantization formats ({', '.join(FORMATS)}), got {list(candidates)!r}"
        )
    tolerance = float(tolerance)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    report = model._core.calibrate(_batches(batches), names, tolerance)
    skip = list(skip)
    formats, stats = {}, {}
    for name, layer in report.items():
        keep = any(glob_match(pattern, name) for pattern in skip)
        formats[name] = "f32" if keep else layer["format"]
        stats[name] = {k: v for k, v in layer.items() if k != "format"}
    plan = QuantizationPlan(formats, stats, tuple(names), tolerance)
    if qat:
        enable_qat(model, plan)
    return plan


def _rules(what: str, spec, skip) -> tuple[str | None, dict[str, str], list[str]]:
    """(format for every matrix or None, {module or glob: format}, skip globs) from the `spec` forms
    `quantize_model` takes, each format checked."""
    skip = [str(s) for s in ([skip] if isinstance(skip, str) else skip)]
    if isinstance(spec, QuantizationPlan):
        default, overrides = None, dict(spec.formats)
    elif isinstance(spec, Mapping):
        default, overrides = None, {str(k): str(v) for k, v in spec.items()}
    elif isinstance(spec, str):
        default, overrides = spec, {}
    else:
        raise TypeError(
            f"{what}: spec must be a format name, a QuantizationPlan or a dict, got {type(spec).__name__}"
        )
    if default is not None:
        _format_name(default, "format")
    for name, fmt in overrides.items():
        _format_name(fmt, f"format for {name!r}")
    return default, overrides, skip


def quantize_model(
    model: Model,
    spec: str | QuantizationPlan | Mapping[str, str] = "q8_0",
    skip: Iterable[str] = (),
) -> Model:
    """Quantizes the model's matrices in place and returns the same model.

    `spec` is a format name for every matrix (token embedding, attention and MLP linears, LM head),
    a `QuantizationPlan`, or a dict {module name or glob pattern: format}; "f32" keeps a module in
    float, and modules a dict does not match stay float. Where several keys match a module, an exact
    name wins, then the longest pattern. `skip` lists glob patterns (`*` matches any run of characters,
    dots included) to keep in float when no dict key names the module. A matrix whose input size is
    not a multiple of the format's block size (32 for q*_0/q*_1, 256 for the k-quants) stays float
    too: a warning names it, and `model.last_quantization_report` holds {"quantized": {module: format},
    "kept_float": {module: reason}}. Matrices already quantized keep their format."""
    _check_model(model)
    default, overrides, skip = _rules("quantize_model", spec, skip)
    report: dict[str, Any] = model._core.quantize(default, overrides, skip)
    model.last_quantization_report = report
    unsupported = {k: v for k, v in report["kept_float"].items() if v != NOT_SELECTED}
    if unsupported:
        listed = "; ".join(f"{k}: {v}" for k, v in unsupported.items())
        warnings.warn(f"kept in float32 ({len(unsupported)} matrices): {listed}", stacklevel=2)
    return model


def enable_qat(
    model: Model,
    spec: str | QuantizationPlan | Mapping[str, str] = "q4_0",
    skip: Iterable[str] = (),
) -> dict[str, dict[str, str]]:
    """Quantization-aware training: from now on each training step (`Trainer.step`, `train_model`,
    `metalcandle train` with `[quantization] qat = "q4_0"`) runs its forward and backward with the
    selected matrices rounded to their format, exactly as `quantize_model` will round them (quantize,
    then dequantize), and applies the gradient taken there to the float weights unchanged (the
    straight-through estimator). The float weights are restored after every step, so checkpoints hold
    them; evaluation (`Trainer.evaluate`) scores the rounded weights, what the quantized model will
    score, while `model.forward` and generation use the float ones.

    With a LoRA adapter the merged weight W + s B A is what gets rounded, as a merge followed by
    `quantize_model` (what `metalcandle quantize` does) will round it. `spec` and `skip` select
    matrices and formats as in `quantize_model`. When training is done, call `quantize_model` with the
    same spec. Returns {"quantized": {module: format}, "kept_float": {module: reason}}."""
    _check_model(model)
    default, overrides, skip = _rules("enable_qat", spec, skip)
    quantized, kept_float = model._core.set_qat(default, overrides, skip)
    if not quantized:
        raise ValueError(
            "enable_qat: no matrix takes the format(s) given: "
            + ("; ".join(f"{k}: {v}" for k, v in kept_float.items()) or "the model has no matrices")
        )
    return {"quantized": quantized, "kept_float": kept_float}


def disable_qat(model: Model) -> Model:
    """Turns quantization-aware training off (training steps use the float weights again)."""
    _check_model(model)._core.clear_qat()
    return model


def dequantize_model(model: Model) -> Model:
    """Replaces every quantized matrix by its float32 values (what the format stores), in place; returns
    the model, which then trains, merges and saves as a standard float model."""
    _check_model(model)._core.dequantize()
    return model


def is_model_quantized(model: Model) -> bool:
    """True when at least one matrix of the model is stored in a quantized format."""
    return _check_model(model).is_quantized


# --- `metalcandle quantize` -----------------------------------------------------------------------------


def _run_source(cfg, checkpoint):
    """What `metalcandle quantize` reads: --checkpoint, else the run's final checkpoint (its best one
    when training stopped early), else the [model] base."""
    from metalcandle import checkpoint as ck
    from metalcandle.loading import resolve_base, untrained_error

    if checkpoint is not None:
        folder = Path(checkpoint).absolute()
        if not folder.exists():
            raise UserError(f"--checkpoint: {folder} does not exist")
        return folder
    last = ck.latest_checkpoint(cfg.output_dir / "checkpoints")
    if last is not None:
        best = cfg.output_dir / "best"
        stopped_early = ck.read_json(last / ck.STATE_FILE).get("stopped_early")
        return best if stopped_early and ck.is_checkpoint(best) else last
    base = resolve_base(cfg)
    if base is None:
        raise untrained_error(cfg)
    return base.path


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def quantize_run(cfg, fmt: str, out, checkpoint=None, skip: Iterable[str] = ()) -> list[str]:
    """Quantizes the model a run config resolves to and writes out/model.gguf (tokenizer and config
    embedded), out/tokenizer.json (+ tokenizer_config.json) and out/config.json. Returns the summary
    lines the command prints."""
    from metalcandle.loading import load_folder_tokenizer, load_model_dir, use_hardware
    from metalcandle.model import GGUF_FILE

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a folder")
    source = _run_source(cfg, checkpoint)
    # Read in float32 whatever hardware.dtype says: the blocks are rounded from the float weights.
    device = use_hardware(cfg)
    if source.is_file():
        from metalcandle.model import load_model
        from metalcandle.tokenizers import load_tokenizer

        model, tokenizer = load_model(source, device=device), load_tokenizer(source)
    else:
        model = load_model_dir(source, device, models_dir=cfg.models_dir)
        tokenizer = load_folder_tokenizer(source, cfg.models_dir)
    lines = [f"model: {source}"]
    if model.has_adapter:
        # GGUF has no place for an adapter: its delta goes into the float weights before rounding.
        model.merge_adapter()
        model.remove_adapter()
        lines.append("LoRA adapter merged into the base weights before quantizing")
    before = 4 * model.num_parameters()
    with warnings.catch_warnings():
        # The summary below lists what stayed float and why.
        warnings.simplefilter("ignore")
        quantize_model(model, fmt, skip=skip)
    report = model.last_quantization_report
    info = model.quantization_info()
    out.mkdir(parents=True, exist_ok=True)
    gguf = out / GGUF_FILE
    model.save_gguf(gguf, tokenizer)
    tokenizer.save(out)
    (out / "config.json").write_text(json.dumps(model.config, indent=2) + "\n", encoding="utf-8")

    quantized_weights = sum(int(np.prod(layer["shape"])) for layer in info["layers"].values())
    after = info["quantized_bytes"] + 4 * (model.num_parameters() - quantized_weights)
    lines.append(f"format: {fmt}")
    lines.append(f"layers: {len(report['quantized'])} quantized, {len(report['kept_float'])} kept float")
    lines += [f"  kept float: {name} ({why})" for name, why in report["kept_float"].items()]
    ratio = before / after if after else float("inf")
    lines.append(f"weights: {_mib(before)} float32 -> {_mib(after)} ({ratio:.2f}x smaller)")
    lines.append(f"file: {gguf} ({_mib(gguf.stat().st_size)}, tokenizer and config included)")
    lines.append(f"also wrote: {out / 'tokenizer.json'}, {out / 'config.json'}")
    return lines

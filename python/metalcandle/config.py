"""The run config: a TOML file validated against a fixed schema before any work starts.

Every section and key is declared below with its type, default and allowed range, so unknown
keys get a did-you-mean and wrong values an error naming the file, the key and what was expected.
Paths to inputs (data, model, tokenizer) are taken relative to the config file; output paths
(`output_dir`, `models_dir`) relative to the working directory, where the user runs the command.

[hardware] says where and how a run computes (device, dtype, threads, gradient checkpointing, the
fused path), apart from the model: it is left out of the config's hash, so the same run keeps its
hash, resumes, and has its data-parallel ranks agree under any hardware settings.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from metalcandle import optim
from metalcandle.data import FORMATS as DATA_FORMATS
from metalcandle.errors import UserError, did_you_mean
from metalcandle.hooks import SECTIONS as HOOK_SECTIONS
from metalcandle.hooks import check_entry
from metalcandle.model import DTYPES
from metalcandle.presets import PRESETS, is_gpt2, preset_spec
from metalcandle.quantize import FORMATS as QUANT_FORMATS
from metalcandle.registry import check_name

REQUIRED = object()  # default marker: the key must be given


@dataclass(frozen=True)
class Key:
    """One config key: its type ("int", "float", "str", "bool", "str_list", "float_pair",
    "resume", "target_modules", "hooks"), default, and optional range or choices."""

    kind: str
    default: Any = None
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False


SPEC_KEYS: dict[str, Key] = {
    "architecture": Key("str", "custom-transformer", choices=("custom-transformer",)),
    # A named shape (metalcandle.presets) whose keys fill in those not written here.
    "preset": Key("str", None, choices=tuple(PRESETS)),
    "vocab_size": Key("int", None, min=2),  # None: the tokenizer's; larger leaves unused rows
    "d_model": Key("int", 128, min=1),
    "n_layers": Key("int", 4, min=1),
    "n_heads": Key("int", 4, min=1),
    "n_kv_heads": Key("int", None, min=1),  # None: same as n_heads
    "d_ff": Key("int", None, min=1),  # None: 4 * d_model
    "max_seq_len": Key("int", None, min=1),  # None: data.seq_len
    "norm": Key("str", "layernorm", choices=("layernorm", "rmsnorm")),
    "mlp": Key("str", "gelu", choices=("gelu", "gelu_tanh", "swiglu", "relu")),
    "positions": Key("str", "learned", choices=("learned", "sinusoidal", "rope")),
    "tie_embeddings": Key("bool", True),
    "dropout": Key("float", 0.0, min=0.0, max=1.0, max_exclusive=True),  # as the core checks it
    # [[model.spec.layer_overrides]]: layers = 3 | [0, 5] | "0::4", and the keys below for them.
    "layer_overrides": Key("layer_overrides", []),
}

LAYER_OVERRIDE_KEYS: dict[str, Key] = {
    "sliding_window": Key("int", None, min=1),
    "d_ff": Key("int", None, min=1),
    "n_heads": Key("int", None, min=1),
    "n_kv_heads": Key("int", None, min=1),
}

SCHEMA: dict[str, dict[str, Key]] = {
    "run": {
        "name": Key("str", REQUIRED),
        "output_dir": Key("str", None),  # None: runs/<name>
        "seed": Key("int", 0, min=0),
        "models_dir": Key("str", None),  # None: $METALCANDLE_MODELS_DIR or ./models
    },
    "model": {
        "name": Key("str", None),
        "path": Key("str", None),
        # "spec" is a sub-table, validated with SPEC_KEYS.
    },
    "tokenizer": {
        "kind": Key("str", None, choices=("pretrained", "char", "bpe")),  # None: from [model]
        "vocab_size": Key("int", 1024, min=2),
        "charset": Key("str", "ascii", choices=("ascii",)),
    },
    "data": {
        "train": Key("str_list", REQUIRED),
        "valid": Key("str_list", None),
        "valid_fraction": Key("float", 0.1, min=0.0, max=0.9),
        "format": Key("str", "auto", choices=("auto", *DATA_FORMATS)),
        "seq_len": Key("int", None, min=2),  # None: 256 from scratch, 512 for pretrained models
        "mask_prompt": Key("bool", True),
        "packing": Key("bool", True),
    },
    "lora": {
        "r": Key("int", 8, min=1),
        "alpha": Key("float", 16.0, min=0.0, min_exclusive=True),
        "dropout": Key("float", 0.0, min=0.0, max=1.0, max_exclusive=True),
        "target_modules": Key("target_modules", ["q_proj", "v_proj"]),
        "use_rslora": Key("bool", False),
    },
    # The keys left out take the defaults of the optimizer `name` picks (`metalcandle.optim`), so a
    # config's "lion" is `mc.Lion()`; see `_optimizer_defaults`.
    "optimizer": {
        "name": Key("str", "adamw", choices=("adamw", "sgd", "lion")),
        "lr": Key("float", None, min=0.0, min_exclusive=True),
        "betas": Key("float_pair", None, min=0.0, max=1.0, max_exclusive=True),
        "eps": Key("float", None, min=0.0, min_exclusive=True),
        "weight_decay": Key("float", None, min=0.0),
        # SGD only.
        "momentum": Key("float", None, min=0.0),
        "nesterov": Key("bool", None),
    },
    "scheduler": {
        "name": Key("str", "cosine", choices=("constant", "linear", "cosine")),
        "warmup_steps": Key("int", 0, min=0),
        "min_lr_ratio": Key("float", 0.1, min=0.0, max=1.0),
    },
    "train": {
        "max_steps": Key("int", None, min=1),
        "epochs": Key("float", None, min=0.0, min_exclusive=True),
        "batch_size": Key("int", 8, min=1),
        "grad_accum": Key("int", 1, min=1),
        "max_grad_norm": Key("float", 1.0, min=0.0),  # 0 disables clipping
        "eval_every": Key("int", 100, min=1),
        "eval_batches": Key("int", 10, min=1),
        "save_every": Key("int", 100, min=1),
        "keep_last": Key("int", 2, min=1),
        "early_stopping_patience": Key("int", 0, min=0),  # evaluations without improvement; 0 = off
        "log_every": Key("int", 10, min=1),
        "resume": Key("resume", "auto"),
    },
    # Where and how the run computes; not part of the hash (see HASHED_WITHOUT).
    "hardware": {
        "device": Key("str", "auto", choices=("auto", "cpu", "cuda", "metal")),
        "dtype": Key("str", "float32", choices=DTYPES),  # of the weights, and so of the optimizer state
        "threads": Key("int", 0, min=0),  # CPU threads; 0: the library's default (RAYON_NUM_THREADS or all)
        "gradient_checkpointing": Key("bool", False),
        "fused": Key("bool", True),  # the fused CPU training step where the model allows it
    },
    # Quantization-aware training (metalcandle.enable_qat): each step's forward and backward see
    # the matrices rounded to `qat`'s format; `metalcandle quantize` then defaults to that format.
    # Absent means float training.
    "quantization": {
        "qat": Key("str", REQUIRED, choices=QUANT_FORMATS),
        "skip": Key("str_list", []),  # glob patterns of modules kept float, as `quantize --skip`
    },
    "generate": {
        "max_new_tokens": Key("int", 64, min=0),
        "temperature": Key("float", 0.8, min=0.0),  # 0 = greedy
        "top_k": Key("int", 0, min=0),  # 0 = off
        "top_p": Key("float", 1.0, min=0.0, max=1.0, min_exclusive=True),
        "repetition_penalty": Key("float", 1.0, min=0.0, min_exclusive=True),
        "num_beams": Key("int", 1, min=1),
        "seed": Key("int", 0, min=0),
    },
    # Experiment hooks, as arrays of tables ([[hooks.forward]] ...): the sections, and the kinds and
    # parameters each entry is checked against, are the core's hook vocabulary (`metalcandle.hooks`
    # reads it; whether a point exists depends on the model, so that is checked when the hooks are
    # attached). They are part of the resolved config, so of its hash:
    # two runs with different hooks never look alike.
    "hooks": {section: Key("hooks", []) for section in HOOK_SECTIONS},
}

OPTIONAL_SECTIONS = {"lora", "quantization"}  # absent means: full training, float training

# Sections left out of `Config.hash`: where and how a run computes may differ between the attempts
# (resumes) and the ranks of one run.
HASHED_WITHOUT = ("hardware",)

# Where [hardware] keys lived before the section existed. Config files (and resolved configs in
# checkpoints) written then keep working: the old key is read as its alias, must agree with the
# [hardware] key when both are given, and resolves to the [hardware] key alone.
HARDWARE_ALIASES: dict[str, str] = {
    "run.device": "device",
    "train.gradient_checkpointing": "gradient_checkpointing",
}


@dataclass
class Config:
    """A validated config: `sections[section][key]` with every default filled in."""

    sections: dict[str, dict[str, Any]]
    source: Path | None = None  # the TOML file, for relative paths and messages

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def input_path(self, p: str) -> Path:
        """An input path as written in the config, resolved against the config's folder."""
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_dir(self) -> Path:
        out = self["run"]["output_dir"] or os.path.join("runs", self["run"]["name"])
        return Path(os.path.expanduser(out)).absolute()

    @property
    def models_dir(self) -> Path:
        from metalcandle.registry import default_models_dir

        return default_models_dir(self["run"]["models_dir"])

    @property
    def is_lora(self) -> bool:
        return self.sections.get("lora") is not None

    @property
    def from_scratch(self) -> bool:
        return self["model"].get("spec") is not None

    def to_dict(self) -> dict:
        return copy.deepcopy(self.sections)

    def hash(self) -> str:
        """sha256 of the resolved config (canonical JSON) without the HASHED_WITHOUT sections, short
        form; stored with checkpoints and metrics, compared on resume and across ranks."""
        hashed = {k: v for k, v in self.sections.items() if k not in HASHED_WITHOUT}
        blob = json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()  # the value, in a diff, of a key that one side does not have


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf that differs between two resolved
    configs, in a stable order. Hook lists of the same length are compared entry by entry, so a
    changed hook parameter is named as `hooks.forward[0].scale`."""
    out = []
    for k in list(a) + [k for k in b if k not in a]:
        dotted = f"{prefix}{k}"
        va, vb = a.get(k, ABSENT), b.get(k, ABSENT)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, dotted + ".")
        elif _same_length_tables(va, vb) and va != vb:
            for i, (x, y) in enumerate(zip(va, vb, strict=True)):
                out += diff_configs(x, y, f"{dotted}[{i}].")
        elif va != vb:
            out.append((dotted, va, vb))
    return out


def _same_length_tables(a: Any, b: Any) -> bool:
    return (
        isinstance(a, list)
        and isinstance(b, list)
        and len(a) == len(b)
        and all(isinstance(x, dict) for x in a + b)
    )


def _where(source: Path | None) -> str:
    return f"{source}: " if source else ""


def _check_value(where: str, dotted: str, key: Key, value: Any) -> Any:
    """The value converted to the key's type, or a UserError naming the key and the expectation."""

    def bad(expected: str):
        raise UserError(f"{where}{dotted} must be {expected}, got {value!r}")

    def in_range(v, expected):
        lo_ok = key.min is None or (v > key.min if key.min_exclusive else v >= key.min)
        hi_ok = key.max is None or (v < key.max if key.max_exclusive else v <= key.max)
        if not (lo_ok and hi_ok):
            lo = "" if key.min is None else (f"> {key.min}" if key.min_exclusive else f">= {key.min}")
            hi = "" if key.max is None else (f"< {key.max}" if key.max_exclusive else f"<= {key.max}")
            bad(f"{expected} {' and '.join(s for s in (lo, hi) if s)}")
        return v

    k = key.kind
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            bad("an integer")
        return in_range(value, "an integer")
    if k == "float":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            bad("a number")
        return in_range(float(value), "a number")
    if k == "bool":
        if not isinstance(value, bool):
            bad("true or false")
        return value
    if k == "str":
        if not isinstance(value, str):
            bad("one of " + ", ".join(f'"{c}"' for c in key.choices) if key.choices else "a string")
        if key.choices and value not in key.choices:
            choices = ", ".join(f'"{c}"' for c in key.choices)
            raise UserError(
                f"{where}{dotted} must be one of {choices}, got {value!r}{did_you_mean(value, key.choices)}"
            )
        return value
    if k == "str_list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            bad("a path or a non-empty list of paths")
        return value
    if k == "float_pair":
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            bad("a list of two numbers like [0.9, 0.999]")
        for v in value:
            if not 0.0 <= v < 1.0:
                bad("two numbers in [0, 1)")
        return [float(v) for v in value]
    if k == "target_modules":
        if value == "all-linear":
            return value
        if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
            bad('"all-linear" or a non-empty list of module names like ["q_proj", "v_proj"]')
        return value
    if k == "hooks":
        return _check_hooks(where, dotted, value)
    if k == "layer_overrides":
        return _check_layer_overrides(where, dotted, value)
    if k == "resume":
        if value is False or value in ("auto", "false", "never"):
            return False if value in (False, "false", "never") else "auto"
        if isinstance(value, str) and value:
            return value
        bad('"auto", false, or a checkpoint path')
    raise AssertionError(f"unknown key kind {k}")


def _check_hooks(where: str, dotted: str, value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(
            f'{where}{dotted} must be an array of tables ([[{dotted}]] with kind = "..."), got {value!r}'
        )
    out = []
    for i, entry in enumerate(value):
        at = f"{dotted}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f'{where}{at} must be a table with kind = "...", got {entry!r}')
        try:
            # Checked key by key (unknown keys refused, each value's type and finiteness, so that
            # the resolved config hashes as JSON and compares on resume), and with its defaults
            # filled in, like every other key, so spelling one out changes no hash.
            out.append(check_entry(dotted.split(".", 1)[1], entry, at))
        except ValueError as e:
            raise UserError(f"{where}{e}") from None
    return out


def _check_layer_overrides(where: str, dotted: str, value: Any) -> list[dict]:
    """Each entry's keys and types; which layers exist is checked with the model's layer count."""
    if not isinstance(value, list):
        raise UserError(f"{where}{dotted} must be an array of tables ([[{dotted}]] with layers = ...)")
    out = []
    for i, entry in enumerate(value):
        at = f"{dotted}[{i}]"
        if not isinstance(entry, dict) or "layers" not in entry:
            raise UserError(f'{where}{at} must be a table with layers = 3, [0, 5] or "0::4", got {entry!r}')
        layers = entry["layers"]
        ok = (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0) or isinstance(
            layers, str
        )
        ok = ok or (
            isinstance(layers, list)
            and bool(layers)
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers)
        )
        if not ok:
            raise UserError(f'{where}{at}.layers must be an index, a list of indices or a slice like "0::4"')
        rest = {k: v for k, v in entry.items() if k != "layers"}
        if not rest:
            raise UserError(f"{where}{at} changes nothing: give one of {', '.join(LAYER_OVERRIDE_KEYS)}")
        checked = _validate_table(where, at, rest, LAYER_OVERRIDE_KEYS)
        out.append({"layers": layers, **{k: v for k, v in checked.items() if v is not None}})
    return out


def _validate_table(where: str, section: str, table: Any, keys: dict[str, Key]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise UserError(f"{where}[{section}] must be a table, got {table!r}")
    out: dict[str, Any] = {}
    for name, value in table.items():
        if name not in keys:
            raise UserError(f"{where}unknown key '{section}.{name}'{did_you_mean(name, keys)}")
        out[name] = _check_value(where, f"{section}.{name}", keys[name], value)
    for name, key in keys.items():
        if name not in out:
            if key.default is REQUIRED:
                raise UserError(f"{where}missing required key '{section}.{name}'")
            out[name] = copy.deepcopy(key.default)
    return out


def _move_hardware_aliases(where: str, raw: dict) -> dict:
    """`raw` with each HARDWARE_ALIASES key given moved into [hardware]: checked under its own name,
    and refused, naming both keys, when [hardware] gives the same setting another value."""
    raw = dict(raw)
    for dotted, name in HARDWARE_ALIASES.items():
        section, key = dotted.split(".")
        table = raw.get(section)
        if not isinstance(table, dict) or key not in table:
            continue
        table = raw[section] = dict(table)
        spec = SCHEMA["hardware"][name]
        value = _check_value(where, dotted, spec, table.pop(key))
        hardware = raw.get("hardware", {})
        if not isinstance(hardware, dict):
            continue  # reported as "[hardware] must be a table" with the other sections
        hardware = raw["hardware"] = dict(hardware)
        if name in hardware:
            given = _check_value(where, f"hardware.{name}", spec, hardware[name])
            if given != value:
                raise UserError(
                    f"{where}{dotted} = {_toml_value(value)} and hardware.{name} = {_toml_value(given)} "
                    f"disagree; keep hardware.{name} ({dotted} is its old name)"
                )
        hardware[name] = value
    return raw


def _toml_value(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)


def upgrade_saved(config: dict) -> dict:
    """A resolved config saved before [hardware] existed, as it resolves now: the aliased keys
    moved into [hardware] and its other keys at the defaults that run had (float32, the library's
    threads, the fused path), so comparing it with a current config shows real differences only."""
    config = dict(config)
    hardware = dict(config.get("hardware") or {})
    for dotted, name in HARDWARE_ALIASES.items():
        section, key = dotted.split(".")
        table = config.get(section)
        if isinstance(table, dict) and key in table:
            table = config[section] = dict(table)
            hardware.setdefault(name, table.pop(key))
    for name, key in SCHEMA["hardware"].items():
        hardware.setdefault(name, key.default)
    config["hardware"] = hardware
    return config


def validate(raw: dict, source: Path | None = None) -> Config:
    """Checks every section and key of a parsed TOML document and fills in defaults."""
    where = _where(source)
    sections: dict[str, Any] = {}
    for name in raw:
        if name not in SCHEMA:
            raise UserError(f"{where}unknown section [{name}]{did_you_mean(name, SCHEMA)}")
    raw = _move_hardware_aliases(where, raw)
    for name, keys in SCHEMA.items():
        table = raw.get(name)
        if table is None and name in OPTIONAL_SECTIONS:
            sections[name] = None
            continue
        if table is not None and not isinstance(table, dict):
            raise UserError(f"{where}[{name}] must be a table, got {table!r}")
        table = dict(table or {})
        spec = table.pop("spec", None) if name == "model" else None
        sections[name] = _validate_table(where, name, table, keys)
        if name == "model":
            sections[name]["spec"] = None if spec is None else _validate_spec(where, spec)

    _check_cross_keys(where, sections)
    return Config(sections=sections, source=source)


def _validate_spec(where: str, spec: Any) -> dict[str, Any]:
    """[model.spec] with its preset's keys under the ones written out."""
    if isinstance(spec, dict) and spec.get("preset") is not None:
        preset = _check_value(where, "model.spec.preset", SPEC_KEYS["preset"], spec["preset"])
        spec = {**preset_spec(preset), **spec}
    return _validate_table(where, "model.spec", spec, SPEC_KEYS)


def _check_cross_keys(where: str, s: dict) -> None:
    """Constraints that involve more than one key."""
    # The run's name becomes folder names (runs/<name>, the registry's <models_dir>/<name>).
    check_name(s["run"]["name"], f"{where}run.name")
    m = s["model"]
    if m.get("name") is not None:
        check_name(m["name"], f"{where}model.name")
    given = [k for k in ("name", "path", "spec") if m.get(k) is not None]
    if len(given) != 1:
        raise UserError(
            f"{where}[model] needs exactly one of 'name' (a registry model), 'path' (a Hugging Face "
            f"folder) or a [model.spec] table (train from scratch); got {given or 'none'}"
        )
    tok = s["tokenizer"]
    if m["spec"] is not None:
        gpt2 = is_gpt2(m["spec"]["preset"])
        if tok["kind"] is None:
            # GPT-2's vocabulary is byte-level BPE; a preset's vocab_size sizes the BPE to match.
            tok["kind"] = "bpe" if gpt2 else "char"
            if gpt2 and tok["vocab_size"] == SCHEMA["tokenizer"]["vocab_size"].default:
                tok["vocab_size"] = m["spec"]["vocab_size"]
        if tok["kind"] == "pretrained":
            raise UserError(f'{where}tokenizer.kind = "pretrained" needs a pretrained [model] (name or path)')
        if s["lora"] is not None:
            raise UserError(f"{where}[lora] needs a pretrained [model] (name or path), not [model.spec]")
        spec = m["spec"]
        if spec["n_kv_heads"] is None:
            spec["n_kv_heads"] = spec["n_heads"]
        if spec["d_ff"] is None:
            spec["d_ff"] = 4 * spec["d_model"]
        if spec["d_model"] % spec["n_heads"]:
            raise UserError(
                f"{where}model.spec.d_model ({spec['d_model']}) must be divisible by "
                f"n_heads ({spec['n_heads']})"
            )
        if spec["n_heads"] % spec["n_kv_heads"]:
            raise UserError(
                f"{where}model.spec.n_heads ({spec['n_heads']}) must be divisible by "
                f"n_kv_heads ({spec['n_kv_heads']})"
            )
        if s["data"]["seq_len"] is None:
            if spec["max_seq_len"] is None:
                s["data"]["seq_len"] = 256
            else:  # a GPT-2 preset trains on its whole context, as GPT-2 did
                s["data"]["seq_len"] = spec["max_seq_len"] if gpt2 else min(256, spec["max_seq_len"])
        if spec["max_seq_len"] is None:
            spec["max_seq_len"] = s["data"]["seq_len"]
        if s["data"]["seq_len"] > spec["max_seq_len"]:
            raise UserError(
                f"{where}data.seq_len ({s['data']['seq_len']}) must be <= "
                f"model.spec.max_seq_len ({spec['max_seq_len']})"
            )
    else:
        if tok["kind"] is None:
            tok["kind"] = "pretrained"
        if tok["kind"] != "pretrained":
            raise UserError(
                f'{where}tokenizer.kind must be "pretrained" for a pretrained model '
                "(it brings its own tokenizer.json), "
                f"got {tok['kind']!r}"
            )
        if s["data"]["seq_len"] is None:
            s["data"]["seq_len"] = 512
    o = s["optimizer"]
    for name, value in _optimizer_defaults(o["name"]).items():
        if name in o and o[name] is None:  # not given
            o[name] = _check_value(where, f"optimizer.{name}", SCHEMA["optimizer"][name], value)
    if o["name"] == "sgd" and o["nesterov"] and o["momentum"] == 0:
        raise UserError(
            f"{where}optimizer.nesterov = true needs optimizer.momentum > 0 (Nesterov's variant of "
            "momentum), got momentum = 0"
        )
    t = s["train"]
    if t["max_steps"] is None and t["epochs"] is None:
        raise UserError(f"{where}[train] needs 'max_steps' or 'epochs'")
    if t["max_steps"] is not None and t["epochs"] is not None:
        raise UserError(f"{where}[train] takes 'max_steps' or 'epochs', not both")
    if s["data"]["valid"] is None and s["data"]["valid_fraction"] <= 0:
        raise UserError(f"{where}[data] needs 'valid' files or a 'valid_fraction' > 0 for evaluation")
    dtype = s["hardware"]["dtype"]
    if s["lora"] is not None and dtype != "float32":
        # The core keeps an adapter's matrices in float32, and a product of those with half
        # precision base weights is refused at the first step: better said before any work starts.
        raise UserError(
            f'{where}hardware.dtype = "{dtype}" with [lora]: a LoRA adapter trains on a float32 base; '
            'use hardware.dtype = "float32"'
        )


def _optimizer_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of optimizer `name`'s class in `metalcandle.optim` (`mc.Lion()` for
    "lion"), and for the keys that class does not take those of the base `Optimizer`, so the
    resolved config names every key. Tuples come as lists, as TOML writes them."""
    cls = {"adamw": optim.AdamW, "sgd": optim.SGD, "lion": optim.Lion}[name]
    out = {}
    for init in (optim.Optimizer.__init__, cls.__init__):
        for key, p in inspect.signature(init).parameters.items():
            if p.default is not inspect.Parameter.empty:
                out[key] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (or `model.spec.key=value`) with the value parsed as TOML, falling
    back to a bare string, so `--set train.max_steps=10` gives an int and `--set run.name=x` a str."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    dotted, value = text.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise UserError(f"--set {text!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return parts, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """The parsed TOML with `--set` values applied; `section.key=` (nothing after `=`) removes the
    key, e.g. `--set model.name= --set model.path=/some/folder` to swap the model source."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        table = raw
        for p in parts[:-1]:
            table = table.setdefault(p, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {text!r}: {'.'.join(parts[:-1])} is not a table")
        if value == "":
            table.pop(parts[-1], None)
        else:
            table[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Reads, overrides and validates a TOML config; every problem is a one-line UserError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    raw = apply_overrides(raw, overrides or [])
    return validate(raw, source=path.absolute())


def to_toml(sections: dict) -> str:
    """The resolved config written back as TOML (saved with every checkpoint). None values are
    omitted, since TOML has no null and omission means the same default."""

    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):  # hook entries, as inline tables
            return "{" + ", ".join(f"{key(k)} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    def key(k: str) -> str:
        return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else json.dumps(k)

    lines = []
    for name, table in sections.items():
        if table is None:
            continue
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{name}]")
        lines += [f"{k} = {fmt(v)}" for k, v in table.items() if v is not None and not isinstance(v, dict)]
        lines.append("")
        for sub, subtable in nested.items():
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {fmt(v)}" for k, v in subtable.items() if v is not None]
            lines.append("")
    return "\n".join(lines)

"""Turning a config into a model and a tokenizer: from scratch, from a registry name, from a Hugging
Face folder, or from a checkpoint (a full model, or a LoRA adapter on top of its base)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from metalcandle.checkpoint import METADATA_FILE, read_json
from metalcandle.config import Config
from metalcandle.errors import UserError
from metalcandle.registry import Registry

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class BaseModel:
    """Where a pretrained model comes from: its folder and the lineage fields."""

    path: Path
    name: str  # registry name, or the folder name for a bare path
    registered: bool
    entry: dict = field(default_factory=dict)


def device_of(cfg: Config) -> str:
    from metalcandle.devices import resolve_device

    return resolve_device(cfg["hardware"]["device"])


def use_hardware(cfg: Config) -> str:
    """Applies hardware.threads, before anything computes, and returns the device to load onto."""
    from metalcandle.devices import apply_threads

    apply_threads(cfg["hardware"]["threads"])
    return device_of(cfg)


def resolve_base(cfg: Config) -> BaseModel | None:
    """The pretrained model named by [model] (None when training from scratch)."""
    m = cfg["model"]
    if m["spec"] is not None:
        return None
    if m["name"] is not None:
        entry = Registry(cfg.models_dir).get(m["name"])
        return BaseModel(Path(entry["path"]), m["name"], True, entry)
    path = cfg.input_path(m["path"])
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"model.path: {path} is not a model folder (no config.json)")
    return BaseModel(path.absolute(), path.name, False)


def untrained_error(cfg: Config) -> UserError:
    """For a command that needs weights of a from-scratch run that has no checkpoint yet."""
    return UserError(
        f"{cfg.source}: a from-scratch model has no weights until trained; no checkpoint in "
        f"{cfg.output_dir / 'checkpoints'} (train first, or pass --checkpoint DIR)"
    )


def build_tokenizer(cfg: Config, base: BaseModel | None, train_files: list[Path]):
    from metalcandle import tokenizers as tk

    kind = cfg["tokenizer"]["kind"]
    if kind == "pretrained":
        assert base is not None
        try:
            return tk.load_tokenizer(base.path)
        except FileNotFoundError:
            raise UserError(f"model {base.name}: no tokenizer.json in {base.path}") from None
    if kind == "char":
        return tk.CharTokenizer()
    # BPE learns its merges from the training files only, so validation text stays unseen.
    return tk.train_bpe([Path(p) for p in train_files], vocab_size=cfg["tokenizer"]["vocab_size"])


def scratch_model_config(cfg: Config, vocab_size: int) -> dict:
    """The config.json of a from-scratch model for a tokenizer of `vocab_size` ids: the spec's own
    vocab_size when given (it may be larger, leaving rows no id reaches, never smaller)."""
    spec = {k: v for k, v in cfg["model"]["spec"].items() if k not in ("architecture", "preset")}
    rows = spec.pop("vocab_size") or vocab_size
    if rows < vocab_size:
        raise UserError(
            f"{cfg.source}: model.spec.vocab_size ({rows}) is smaller than the tokenizer's {vocab_size} ids"
        )
    return {"model_type": "custom-transformer", "vocab_size": rows, **spec}


def load_model_dir(path: Path, device: str = "cpu", dtype: str = "float32"):
    """A model folder: a Hugging Face folder, a metalcandle checkpoint, or a LoRA adapter folder
    (whose base is found through its metadata.json, or PEFT's base_model_name_or_path), with the
    weights read as `dtype`."""
    import metalcandle as mc

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        base = adapter_base_path(path)
        model = mc.load_model(base, dtype=dtype, device=device)
        model.load_adapter(path)
        return model
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json or {ADAPTER_CONFIG})")
    return mc.load_model(path, dtype=dtype, device=device)


def adapter_base_path(adapter_dir: Path) -> Path:
    meta_file = adapter_dir / METADATA_FILE
    base = None
    if meta_file.is_file():
        base = read_json(meta_file).get("base_model_path")
    if base is None:
        base = read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise UserError(f"{adapter_dir}: LoRA adapter whose base model folder {base!r} is not found")
    return Path(base)


def load_folder_tokenizer(path: Path):
    """The tokenizer saved in a model/checkpoint folder, or in its LoRA base's folder."""
    from metalcandle.tokenizers import load_tokenizer

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    if (path / ADAPTER_CONFIG).is_file():
        return load_tokenizer(adapter_base_path(path))
    raise UserError(f"{path}: no tokenizer.json")

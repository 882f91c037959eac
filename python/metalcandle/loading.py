"""Turning a config into a model and a tokenizer: from scratch, from a registry name, from a Hugging
Face folder, or from a checkpoint (a full model, or a LoRA adapter on top of its base)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from metalcandle.checkpoint import METADATA_FILE, read_json
from metalcandle.config import Config
from metalcandle.errors import UserError
from metalcandle.registry import Registry, check_name

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


def load_model_dir(path: Path, device: str = "cpu", dtype: str = "float32", models_dir=None):
    """A model folder: a Hugging Face folder, a metalcandle checkpoint, or a LoRA adapter folder
    on top of its base (`adapter_base_path`; `models_dir`: the registry a base given by name is
    looked up in when the adapter folder is not in one), with the weights read as `dtype`."""
    import metalcandle as mc

    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        base = adapter_base_path(path, models_dir)
        model = mc.load_model(base, dtype=dtype, device=device)
        model.load_adapter(path)
        return model
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json or {ADAPTER_CONFIG})")
    return mc.load_model(path, dtype=dtype, device=device)


# Where an adapter folder names its base: metalcandle's metadata.json, then PEFT's adapter_config.json.
_BASE_KEYS = ((METADATA_FILE, "base_model_path"), (ADAPTER_CONFIG, "base_model_name_or_path"))


def adapter_base_path(adapter_dir: Path, models_dir=None) -> Path:
    """The base model folder of a LoRA adapter folder, from metadata.json's `base_model_path`
    (what `metalcandle train` writes) or else adapter_config.json's `base_model_name_or_path`
    (what PEFT writes).

    An absolute path is the folder the base was loaded from when the adapter was trained, and is
    taken as it is. Anything else is the name of a registry model, a plain name (`check_name`),
    found in the registry the adapter folder belongs to when it is a registered model, else in
    `models_dir`'s (default: $METALCANDLE_MODELS_DIR or ./models). So a relative value never
    depends on the working folder and never reaches outside the registry ("../x" and "a/b" are
    refused); a hub id ("org/model") is refused too: import the base and write its name, or pass
    the base with the run config's [model] and the adapter with --adapter."""
    adapter_dir = Path(adapter_dir)
    for file_name, key in _BASE_KEYS:
        file = adapter_dir / file_name
        base = read_json(file).get(key) if file.is_file() else None
        if base is not None:
            break
    if not isinstance(base, str) or not base:
        raise UserError(
            f"{adapter_dir}: LoRA adapter without its base model (metadata.json base_model_path or "
            f"{ADAPTER_CONFIG} base_model_name_or_path: an absolute folder or a registry model's name), "
            f"got {base!r}; load the base and attach it with Model.load_adapter, or pass --adapter"
        )
    where = f"{file}: {key}"
    if os.path.isabs(base):
        if not os.path.isdir(base):
            raise UserError(f"{where}: the LoRA adapter's base model folder {base} is not found")
        return Path(base)
    try:
        check_name(base, f"{where} (an absolute folder or a registry model's name)")
    except UserError as e:
        raise UserError(
            f"{e}; for a hub id, import that model (`metalcandle import-model ID`) and write its "
            "registry name there"
        ) from None
    registries = [Registry(models_dir)]
    home = Registry(adapter_dir.absolute().parent)
    with contextlib.suppress(UserError):  # a folder beside a registry.json that is not ours
        if home.file.is_file() and adapter_dir.name in home:
            registries.insert(0, home)
    for registry in registries:
        if base in registry:
            return Path(registry.get(base)["path"])
    raise UserError(
        f"{where}: the LoRA adapter's base model '{base}' is not in the registry "
        f"{registries[0].file} (import it with `metalcandle import-model FOLDER --name {base}`)"
    )


def load_folder_tokenizer(path: Path, models_dir=None):
    """The tokenizer saved in a model/checkpoint folder, or in its LoRA base's folder."""
    from metalcandle.tokenizers import load_tokenizer

    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    if (path / ADAPTER_CONFIG).is_file():
        return load_tokenizer(adapter_base_path(path, models_dir))
    raise UserError(f"{path}: no tokenizer.json")

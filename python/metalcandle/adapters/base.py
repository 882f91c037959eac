"""`BaseAdapter`: one Python interface over every architecture the core runs.

An adapter pairs a core `Model` with its tokenizer and answers the questions the rest of the
package asks about an architecture (its type name, config, parameters) without knowing which one
it is. Concrete adapters register themselves by `architecture_type` with `@register_adapter`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

ADAPTERS: dict[str, type[BaseAdapter]] = {}


def register_adapter(architecture_type: str, *model_types: str):
    """Class decorator: makes the adapter findable by `architecture_type` and by the Hugging Face
    `model_type` values (config.json) it handles (default: the architecture_type itself)."""

    def decorate(cls: type[BaseAdapter]) -> type[BaseAdapter]:
        if architecture_type in ADAPTERS and ADAPTERS[architecture_type] is not cls:
            raise ValueError(
                f"an adapter for {architecture_type!r} is already registered: {ADAPTERS[architecture_type]}"
            )
        cls.architecture_type = architecture_type
        cls.model_types = tuple(model_types) or (architecture_type,)
        ADAPTERS[architecture_type] = cls
        return cls

    return decorate


def get_adapter_class(architecture_type: str) -> type[BaseAdapter]:
    """The adapter for an architecture_type ("qwen") or a config.json model_type ("qwen2")."""
    if architecture_type in ADAPTERS:
        return ADAPTERS[architecture_type]
    for cls in ADAPTERS.values():
        if architecture_type in cls.model_types:
            return cls
    known = ", ".join(sorted(ADAPTERS))
    raise KeyError(f"no adapter for architecture {architecture_type!r} (registered: {known})")


class BaseAdapter(ABC):
    """The interface. Subclasses set nothing but the registration; override a method only where
    an architecture differs (the core already runs all of them)."""

    architecture_type: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu") -> BaseAdapter:
        """A model folder (Hugging Face or metalcandle checkpoint) with its tokenizer if it has one."""
        adapter = cls(None)
        adapter.load_checkpoint(path, device=device)
        return adapter

    # --- the interface --------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None) -> np.ndarray:
        """Logits, float32 [B, T, vocab]."""
        return self.model.forward(input_ids, attention_mask=attention_mask)

    def get_config(self) -> dict[str, Any]:
        return dict(self.model.config)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Weights as a Hugging Face folder (plus the LoRA adapter if one is attached) and the tokenizer."""
        path = Path(path)
        self.model.save_pretrained(path)
        if getattr(self.model, "has_adapter", False):
            self.model.save_adapter(path / "adapter")
        if self.tokenizer is not None:
            self.tokenizer.save(path)

    def load_checkpoint(self, path: str | os.PathLike, device: str = "cpu") -> None:
        import metalcandle as mc

        path = Path(path)
        model = mc.load_model(path, device=device)
        self._check_architecture(model)
        if (path / "adapter" / "adapter_config.json").is_file():
            model.load_adapter(path / "adapter")
        self.model = model
        if (path / "tokenizer.json").is_file():
            from metalcandle.tokenizers import load_tokenizer

            self.tokenizer = load_tokenizer(path)

    def get_architecture_type(self) -> str:
        return self.architecture_type

    def get_num_parameters(self) -> int:
        return self.model.num_parameters()

    def get_tokenizer(self):
        return self.tokenizer

    def parameters(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 array) for every weight, in the checkpoint's naming."""
        for name in self.model.parameter_names():
            yield name, self.model.get_parameter(name)

    # --- helpers --------------------------------------------------------------------------------
    def _check_architecture(self, model) -> None:
        if model.architecture not in self.model_types:
            raise ValueError(
                f"{type(self).__name__} handles {', '.join(self.model_types)} models, "
                f"got {model.architecture!r}"
            )

    @abstractmethod
    def describe(self) -> str:
        """One line for listings (architecture family and size)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

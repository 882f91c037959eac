"""`Model`: a decoder loaded from a Hugging Face folder or built from a config, run on the Rust core."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from metalcandle import _core


def as_ids(name: str, array: Any) -> np.ndarray:
    """Integer array-likes as a C-contiguous int64 [B, T] array, with a clear error otherwise."""
    a = np.asarray(array)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim == 1:
        raise ValueError(f"{name} must be 2-D [batch, seq]; got 1-D shape {a.shape} (wrap it: [{name}])")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, seq], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


class Model:
    """A decoder-only transformer (qwen2, llama, mistral, gpt2 or custom-transformer)."""

    def __init__(self, core: _core.Model):
        self._core = core
        self.config: dict = json.loads(core.config_json())

    @classmethod
    def from_config(cls, config: dict, seed: int = 0, device: str = "cpu") -> Model:
        """A randomly initialised model from a config.json-style dict."""
        return cls(_core.Model.from_config(json.dumps(config), seed, device))

    @property
    def architecture(self) -> str:
        return self._core.architecture

    @property
    def vocab_size(self) -> int:
        return self._core.vocab_size

    @property
    def num_layers(self) -> int:
        return self._core.num_layers

    @property
    def spec(self) -> dict:
        return json.loads(self._core.spec_json())

    def num_parameters(self) -> int:
        return self._core.num_parameters()

    def parameter_names(self) -> list[str]:
        return self._core.parameter_names()

    def get_parameter(self, name: str) -> np.ndarray:
        return self._core.get_parameter(name)

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        """Logits [B, T, V] (float32) for int64 ids [B, T]; with `output_hidden_states`, also the
        hidden states [L+1, B, T, H] (embeddings, each layer, and the final-normed last layer)."""
        ids = as_ids("input_ids", input_ids)
        mask = None if attention_mask is None else as_ids("attention_mask", attention_mask)
        pos = None if position_ids is None else as_ids("position_ids", position_ids)
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if pos is not None and pos.shape != ids.shape:
            raise ValueError(f"position_ids has shape {pos.shape}, input_ids {ids.shape}")
        logits, hidden = self._core.forward(ids, mask, pos, output_hidden_states)
        return (logits, hidden) if output_hidden_states else logits

    __call__ = forward

    def generate(self, prompt_ids, max_new_tokens: int = 16, **kwargs) -> np.ndarray:
        """Prompt + new ids. Greedy with a KV cache unless sampling options are given."""
        from metalcandle.generate import generate

        return generate(self, prompt_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes config.json and model.safetensors that `transformers` loads."""
        self._core.save_pretrained(os.fspath(path))

    def __repr__(self) -> str:
        return f"Model(architecture={self.architecture!r}, parameters={self.num_parameters():,})"


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> Model:
    """Loads a Hugging Face checkpoint folder (config.json + safetensors)."""
    if dtype != "float32":
        raise ValueError(f"dtype {dtype!r} is not supported yet; weights are computed in float32")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    return Model(_core.Model.load(path, device))

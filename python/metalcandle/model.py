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
        self.last_quantization_report: dict | None = None

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

    # LoRA ---------------------------------------------------------------------------------

    def add_lora(
        self,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        target_modules=("q_proj", "v_proj"),
        seed: int = 0,
        use_rslora: bool = False,
        layers_to_transform=None,
    ) -> int:
        """Attaches LoRA adapters with PEFT's initialisation (A kaiming-uniform, B zero) to the
        linears named in `target_modules` (or "all-linear"); returns how many were adapted."""
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
        return self._core.add_lora(
            int(r), float(alpha), float(dropout), targets, int(seed), bool(use_rslora), layers
        )

    def load_adapter(self, path: str | os.PathLike) -> int:
        """Attaches an adapter saved by PEFT or by `save_adapter`."""
        return self._core.load_adapter(os.fspath(path))

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Writes adapter_config.json + adapter_model.safetensors in PEFT's format."""
        self._core.save_adapter(os.fspath(path))

    def merge_adapter(self) -> None:
        self._core.merge_adapter()

    def unmerge_adapter(self) -> None:
        self._core.unmerge_adapter()

    def remove_adapter(self) -> None:
        self._core.remove_adapter()

    @property
    def has_adapter(self) -> bool:
        return self._core.has_adapter

    @property
    def lora_config(self) -> dict | None:
        text = self._core.lora_config_json()
        return None if text is None else json.loads(text)

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """What a training step updates: the adapter matrices, or every parameter."""
        return dict(self._core.trainable_parameters())

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes config.json and model.safetensors that `transformers` loads."""
        self._core.save_pretrained(os.fspath(path))

    # Quantization ------------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        """True when at least one matrix is stored in a quantized block format."""
        return self._core.is_quantized

    def quantization_info(self) -> dict:
        """{"quantized": bool, "layers": {module: {"format", "bits_per_weight", "shape", "bytes"}},
        "float_layers": [module, ...], "quantized_bytes", "float_bytes"} for the token embedding, the
        linear layers and the LM head, plus "format" (the one format used, "mixed", or None) and
        "bits_per_weight" (storage bits per weight over the quantized matrices, or None)."""
        info = json.loads(self._core.quantization_info())
        layers = info["layers"].values()
        formats = sorted({layer["format"] for layer in layers})
        info["format"] = formats[0] if len(formats) == 1 else ("mixed" if formats else None)
        weights = sum(int(np.prod(layer["shape"])) for layer in layers)
        info["bits_per_weight"] = 8 * info["quantized_bytes"] / weights if weights else None
        return info

    def save_gguf(self, path: str | os.PathLike, tokenizer=None) -> None:
        """Writes the model (float, quantized or mixed) as one GGUF file in llama.cpp's conventions,
        with the config embedded and, when given, the tokenizer (a metalcandle tokenizer, a folder
        holding tokenizer.json, or a tokenizer.json file). `load_model(path)` and
        `load_tokenizer(path)` read it back."""
        if isinstance(tokenizer, (str, os.PathLike)) and os.path.isdir(tokenizer):
            from metalcandle.tokenizers import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self._core.save_gguf(
            os.fspath(path),
            _tokenizer_json(tokenizer),
            getattr(tokenizer, "chat_template", None),
            getattr(tokenizer, "pad_token_id", None),
        )

    def __repr__(self) -> str:
        return f"Model(architecture={self.architecture!r}, parameters={self.num_parameters():,})"


GGUF_FILE = "model.gguf"


def is_gguf(path: str | os.PathLike) -> bool:
    """A file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _tokenizer_json(tokenizer) -> str | None:
    """tokenizer.json text of a metalcandle tokenizer, a folder holding tokenizer.json, or that file."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "_backend", None)
    if backend is not None:
        return backend.to_str()
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return f.read()
    raise TypeError(f"tokenizer must be a metalcandle tokenizer or a path, got {type(tokenizer).__name__}")


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> Model:
    """Loads a Hugging Face checkpoint folder (config.json + safetensors), a GGUF file (its quantized
    matrices stay quantized), or a folder holding model.gguf and no safetensors."""
    if dtype != "float32":
        raise ValueError(f"dtype {dtype!r} is not supported yet; weights are computed in float32")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    if os.path.isdir(path):
        gguf = os.path.join(path, GGUF_FILE)
        if os.path.isfile(gguf) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
            path = gguf
    if os.path.isfile(path) and (path.lower().endswith(".gguf") or is_gguf(path)):
        return Model(_core.Model.load_gguf(path, device))
    return Model(_core.Model.load(path, device))

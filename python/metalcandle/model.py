"""`Model`: a decoder loaded from a Hugging Face folder or built from a config, run on the Rust core."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from metalcandle import _core
from metalcandle import hooks as _hooks


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


def check_mask(mask: np.ndarray | None) -> None:
    """An attention mask holds only 0 (padding) and 1 (a token)."""
    if mask is not None and mask.size and not np.isin(mask, (0, 1)).all():
        bad = mask[~np.isin(mask, (0, 1))][0]
        raise ValueError(f"attention_mask must hold only 0 and 1, got {bad}")


def _rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
        raise ValueError(f"r must be > 0 and an integer, got {r!r}")
    return int(r)


class Model:
    """A decoder-only transformer (qwen2, llama, mistral, gpt2, phi3 or custom-transformer)."""

    def __init__(self, core: _core.Model):
        self._core = core
        self.config: dict = core.config()
        self.last_quantization_report: dict | None = None
        self._captures: list = []  # open `capture` blocks
        self._captured: dict = {}  # captured values no open block asked for

    @classmethod
    def from_config(cls, config: dict, seed: int = 0, device: str = "cpu") -> Model:
        """A randomly initialised model from a config.json-style dict."""
        return cls(_core.Model.from_config(config, seed, device))

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
    def max_position_embeddings(self) -> int:
        """The longest sequence the model takes: its position table, or the context RoPE was set for."""
        return self._core.max_position_embeddings

    def load_weights(self, path: str | os.PathLike) -> None:
        """Replaces this model's weights and config by the Hugging Face folder's, in place: whoever
        holds this object (a Trainer, a resumed loop) then trains the loaded model."""
        loaded = load_model(path)
        self._core, self.config = loaded._core, loaded.config

    @property
    def spec(self) -> dict:
        return self._core.spec()

    def num_parameters(self) -> int:
        return self._core.num_parameters()

    def device_memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the GPU the model is on (the whole device, as nvidia-smi counts
        it); None on the CPU."""
        return self._core.device_memory()

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
        check_mask(mask)
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
        if not isinstance(use_rslora, bool | np.bool_):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        return self._core.add_lora(
            _rank(r), float(alpha), float(dropout), targets, int(seed), bool(use_rslora), layers
        )

    def load_adapter(self, path: str | os.PathLike) -> int:
        """Attaches an adapter saved by PEFT or by `save_adapter` in the folder `path` (a path, taken
        as it is, like `load_model`'s; an adapter has no name of its own). Its base is this model:
        the base it names in its files matters only to `metalcandle` loading an adapter folder alone
        (see `metalcandle.loading.adapter_base_path`)."""
        return self._core.load_adapter(os.fspath(path))

    def save_adapter(self, path: str | os.PathLike) -> None:
        """Writes adapter_config.json + adapter_model.safetensors in PEFT's format into the folder
        `path` (a path, taken as it is, like `save_pretrained`'s)."""
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
        return self._core.lora_config()

    def trainable_parameters(self) -> dict[str, np.ndarray]:
        """What a training step updates: the adapter matrices, or every parameter."""
        return dict(self._core.trainable_parameters())

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes config.json and model.safetensors that `transformers` loads."""
        self._core.save_pretrained(os.fspath(path))

    # Experiment hooks ---------------------------------------------------------------------
    # Points, kinds and how gradients flow through them: see `metalcandle.hooks`. A model with no
    # hook attached runs exactly as without this machinery, at no cost.

    def add_forward_hook(self, point: str, fn, *, array=None, **params) -> _hooks.HookHandle:
        """Runs at every point `point` matches (a name like "layers.0.mlp_out" or a glob like
        "layers.*.mlp_out"), in every forward: inference, generation, evaluation and training.

        `fn` is a Python function `fn(point_name, array) -> array | None` (None keeps the value),
        or a built-in kind with its parameters: "capture" (full=True; read with `take_captured`),
        "scale" (factor), "noise" (std, seed=0), "clamp" (min and/or max), "ablate_heads" (heads,
        at attn_scores/attn_probs points) or "patch" (array=, an activation of the point's shape).

        During training a function's replacement is straight-through: the forward uses `f(x)` and
        the gradient passes as if `f` were the identity, `y = x + (f(x) - x).detach()`. Hooks cost
        nothing while none is attached. Returns a handle; `handle.remove()` detaches the hook."""
        return _hooks.add_forward_hook(self, point, fn, array=array, **params)

    def add_backward_hook(self, point: str, fn, **params) -> _hooks.HookHandle:
        """Rewrites the gradient arriving at the points `point` matches before it flows upstream:
        `fn(point_name, grad) -> grad` (None keeps it), or "scale" (factor), "clip_value" (max),
        "clip_norm" (max), "stop_gradient", "straight_through" (the forward hooks at the point are
        skipped by the gradient) or "noise" (std, seed=0). The forward value is unchanged."""
        return _hooks.add_backward_hook(self, point, fn, **params)

    def add_update_hook(self, pattern: str, fn, **params) -> _hooks.HookHandle:
        """Transforms the gradient of each trainable parameter whose name `pattern` matches
        ("model.layers.0.*", "*lora_B*"), after the backward pass and before global-norm clipping
        and the optimizer, in the order added: `fn(name, param, grad) -> grad` (None keeps it),
        or "clip_value" (max), "clip_norm" (max), "noise" (std, seed=0), "sign", "normalize",
        "centralize" or "freeze" (no update, and the optimizer state is left alone)."""
        return _hooks.add_update_hook(self, pattern, fn, **params)

    def add_aux_loss(self, kind: str, weight: float, point: str | None = None) -> _hooks.HookHandle:
        """Adds `weight` x an auxiliary loss to the training objective: "activation_l2" (mean
        square of the values at `point`), "z_loss" (mean squared logsumexp of the logits at the
        label positions) or "attention_entropy" (mean entropy of the attention rows at `point`,
        default "layers.*.attn_probs"). `Trainer.step(...).aux` reports each one unweighted by
        name ("z_loss", "activation_l2[layers.*.mlp_out]"); `.loss` stays the main loss alone."""
        return _hooks.add_aux_loss(self, kind, weight, point)

    def capture(self, points, full: bool = True) -> _hooks.Capture:
        """`with model.capture(["layers.0.mlp_out", "layers.*.attn_probs"]) as cap: model(ids)`
        leaves each matching point's value from the block's latest forward in `cap[point]` (a
        dict-like), as a numpy array, or with `full=False` as statistics (shape, mean, std, min,
        max, absmax). The capture hooks are detached when the block ends."""
        return _hooks.Capture(self, points, full)

    def take_captured(self) -> dict:
        """What "capture" forward hooks recorded outside `capture` blocks since the last call:
        point -> array or statistics."""
        return _hooks.take_captured(self)

    def clear_hooks(self) -> None:
        """Detaches every hook of every kind."""
        self._core.clear_hooks()

    # Quantization ------------------------------------------------------------------------

    @property
    def is_quantized(self) -> bool:
        """True when at least one matrix is stored in a quantized block format."""
        return self._core.is_quantized

    @property
    def qat(self) -> dict[str, str] | None:
        """{module: format} of the matrices quantization-aware training rounds at each training step
        (`metalcandle.enable_qat`), or None when it is off."""
        return self._core.qat

    def quantization_info(self) -> dict:
        """{"quantized": bool, "layers": {module: {"format", "bits_per_weight", "shape", "bytes"}},
        "float_layers": [module, ...], "quantized_bytes", "float_bytes"} for the token embedding, the
        linear layers and the LM head, plus "format" (the one format used, "mixed", or None) and
        "bits_per_weight" (storage bits per weight over the quantized matrices, or None)."""
        info = self._core.quantization_info()
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
    """tokenizer.json text of a metalcandle tokenizer or of a tokenizer.json file (`save_gguf` has
    already loaded a folder as a tokenizer)."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "_backend", None)
    if backend is not None:
        return backend.to_str()
    if isinstance(tokenizer, (str, os.PathLike)):
        path = os.fspath(tokenizer)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        with open(path, encoding="utf-8") as f:
            return f.read()
    raise TypeError(f"tokenizer must be a metalcandle tokenizer or a path, got {type(tokenizer).__name__}")


# What a checkpoint folder's weights can be read as (`load_model`'s dtype, a run's hardware.dtype).
DTYPES = ("float32", "bfloat16", "float16")


def load_model(path: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> Model:
    """Loads a Hugging Face checkpoint folder (config.json + safetensors), a GGUF file (its quantized
    matrices stay quantized), or a folder holding model.gguf and no safetensors.

    `dtype`: "float32", or "bfloat16"/"float16" for a checkpoint folder (meant for a GPU: on the CPU
    half precision takes the slower composed ops, not the float32 kernels). Weights are read
    straight onto `device`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected 'float32', 'bfloat16' or 'float16'")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    if os.path.isdir(path):
        gguf = os.path.join(path, GGUF_FILE)
        if os.path.isfile(gguf) and not any(n.endswith(".safetensors") for n in os.listdir(path)):
            path = gguf
    if os.path.isfile(path) and (path.lower().endswith(".gguf") or is_gguf(path)):
        if dtype != "float32":
            raise ValueError(f"{path}: a GGUF model is computed in float32, not {dtype}")
        return Model(_core.Model.load_gguf(path, device))
    return Model(_core.Model.load(path, device, dtype))

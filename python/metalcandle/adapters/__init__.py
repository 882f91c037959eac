"""Architecture adapters: one `BaseAdapter` interface over the decoders the core runs, selected by
`architecture_type` (not LoRA adapters; those live on `Model.add_lora`). The package keeps the
name the field gives these classes (`metalcandle.adapters.BaseAdapter` is public API); inside the
core, "adapter" always means LoRA."""

from metalcandle.adapters.architectures import (
    CustomTransformerAdapter,
    GPT2Adapter,
    LlamaAdapter,
    MistralAdapter,
    Phi3Adapter,
    QwenAdapter,
)
from metalcandle.adapters.base import ADAPTERS, BaseAdapter, get_adapter_class, register_adapter
from metalcandle.adapters.validation import AdapterValidationError, validate_adapter


def adapter_for(model, tokenizer=None) -> BaseAdapter:
    """Wraps a loaded `Model` in the adapter registered for its architecture."""
    return get_adapter_class(model.architecture)(model, tokenizer)


def architecture_type_of(model) -> str:
    """The registered architecture_type for a loaded model ("qwen" for a qwen2 checkpoint)."""
    return get_adapter_class(model.architecture).architecture_type


def load_adapter_model(path, device: str = "cpu") -> BaseAdapter:
    """A model folder loaded through the adapter its config.json's model_type selects."""
    from pathlib import Path

    from metalcandle.checkpoint import read_json

    model_type = read_json(Path(path) / "config.json")["model_type"]
    return get_adapter_class(model_type).from_pretrained(path, device=device)


__all__ = [
    "ADAPTERS",
    "AdapterValidationError",
    "BaseAdapter",
    "CustomTransformerAdapter",
    "GPT2Adapter",
    "LlamaAdapter",
    "MistralAdapter",
    "Phi3Adapter",
    "QwenAdapter",
    "adapter_for",
    "architecture_type_of",
    "get_adapter_class",
    "load_adapter_model",
    "register_adapter",
    "validate_adapter",
]

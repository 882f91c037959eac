"""The adapters for the architectures the core implements."""

from __future__ import annotations

from metalcandle.adapters.base import BaseAdapter, register_adapter


class _DecoderAdapter(BaseAdapter):
    def describe(self) -> str:
        if self.model is None:
            return "not loaded"
        c = self.model.config
        layers = c.get("num_hidden_layers", c.get("n_layers", c.get("n_layer")))
        width = c.get("hidden_size", c.get("d_model", c.get("n_embd")))
        n = self.get_num_parameters()
        return f"{self.architecture_type}, {layers} layers, width {width}, {n:,} parameters"


@register_adapter("custom-transformer")
class CustomTransformerAdapter(_DecoderAdapter):
    """metalcandle's own configurable decoder (trained from scratch)."""

    @classmethod
    def from_config(
        cls, config: dict, seed: int = 0, tokenizer=None, device: str = "cpu"
    ) -> CustomTransformerAdapter:
        import metalcandle as mc

        return cls(
            mc.Model.from_config({"model_type": "custom-transformer", **config}, seed=seed, device=device),
            tokenizer,
        )


@register_adapter("qwen", "qwen2")
class QwenAdapter(_DecoderAdapter):
    """Qwen2 / Qwen2.5 (config.json model_type "qwen2")."""


@register_adapter("llama")
class LlamaAdapter(_DecoderAdapter):
    """Llama 2/3 and compatible checkpoints."""


@register_adapter("mistral")
class MistralAdapter(_DecoderAdapter):
    """Mistral, including sliding-window attention."""


@register_adapter("phi3")
class Phi3Adapter(_DecoderAdapter):
    """Phi-3 (config.json model_type "phi3"; fused qkv_proj and gate_up_proj)."""


@register_adapter("gpt2")
class GPT2Adapter(_DecoderAdapter):
    """GPT-2 (Conv1D weights are transposed by the core on load and back on save)."""

"""Named model shapes for `[model.spec] preset = "..."` and `metalcandle init --preset NAME`.

A preset fills the [model.spec] keys it names; keys written next to it in the config win. The GPT-2
presets are the published GPT-2 shapes (pre-norm LayerNorm blocks, tanh GELU, learned positions,
tied embeddings, biases, a 50257-row vocabulary and a 1024-token context), so `gpt2-small` has
124,439,808 parameters like the original; `tiny` and `small` are shapes that train in minutes on a
laptop CPU (Llama-style blocks, which learn faster at that size).
"""

from __future__ import annotations

_GPT2 = {
    "norm": "layernorm",
    "mlp": "gelu_tanh",
    "positions": "learned",
    "tie_embeddings": True,
    "vocab_size": 50257,
    "max_seq_len": 1024,
}
_LLAMA_STYLE = {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope", "tie_embeddings": True}

PRESETS: dict[str, dict] = {
    "gpt2-small": {**_GPT2, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 4096},
    "gpt2-large": {**_GPT2, "d_model": 1280, "n_layers": 36, "n_heads": 20, "d_ff": 5120},
    # The README's main job: 0.8M parameters with a character vocabulary.
    "tiny": {**_LLAMA_STYLE, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 352, "max_seq_len": 128},
    # About 10M parameters plus the embedding: a few hours on two cores.
    "small": {**_LLAMA_STYLE, "d_model": 384, "n_layers": 6, "n_heads": 6, "d_ff": 1024, "max_seq_len": 256},
}


def preset_spec(name: str) -> dict:
    """A copy of preset `name`'s [model.spec] keys."""
    return dict(PRESETS[name])


def is_gpt2(name: str | None) -> bool:
    return name is not None and name.startswith("gpt2-")

"""Text generation: prefill and KV-cached decode steps run in Rust; token choice happens here."""

from __future__ import annotations

import numpy as np

from metalcandle.model import as_ids


def generate(model, prompt_ids, max_new_tokens: int = 16, eos_token_id=None) -> np.ndarray:
    """Greedy decoding with a KV cache. Returns prompt + new ids [B, T + n]; rows that emitted
    an EOS id are padded with it afterwards."""
    ids = as_ids("prompt_ids", prompt_ids)
    if ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = set() if eos_token_id is None else {eos_token_id} if np.isscalar(eos_token_id) else set(eos_token_id)
    cache = model._core.new_cache()
    out = [ids]
    done = np.zeros(ids.shape[0], dtype=bool)
    step_in = ids
    for _ in range(max_new_tokens):
        logits = model._core.forward_cached(step_in, cache)
        nxt = logits.argmax(axis=-1).astype(np.int64)
        if eos:
            fill = next(iter(eos))
            nxt = np.where(done, fill, nxt)
            done |= np.isin(nxt, list(eos))
        out.append(nxt[:, None])
        if eos and done.all():
            break
        step_in = nxt[:, None]
    return np.concatenate(out, axis=1)

"""`validate_adapter`: the checks a new adapter must pass before the rest of the package uses it."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import numpy as np

from metalcandle.adapters.base import ADAPTERS, BaseAdapter

REQUIRED_METHODS = (
    "forward",
    "get_config",
    "save_checkpoint",
    "load_checkpoint",
    "get_architecture_type",
    "get_num_parameters",
    "get_tokenizer",
    "parameters",
)


class AdapterValidationError(AssertionError):
    pass


def validate_adapter(adapter: BaseAdapter, seq_len: int = 8, batch: int = 2) -> dict:
    """Checks that the adapter implements the interface, that forward gives [B, T, vocab] finite
    float32 logits, that get_num_parameters equals the sum of parameter sizes, and that a
    save_checkpoint / load_checkpoint round trip reproduces the logits exactly. Returns a small
    report; raises AdapterValidationError naming the first failed check."""

    def fail(msg: str):
        raise AdapterValidationError(f"{type(adapter).__name__}: {msg}")

    for name in REQUIRED_METHODS:
        if not callable(getattr(adapter, name, None)):
            fail(f"missing method {name}()")
    arch = adapter.get_architecture_type()
    if ADAPTERS.get(arch) is not type(adapter):
        fail(f"architecture_type {arch!r} is not registered to this class (use @register_adapter)")
    sig = inspect.signature(adapter.forward)
    if "attention_mask" not in sig.parameters:
        fail("forward() must accept attention_mask")

    config = adapter.get_config()
    if not isinstance(config, dict):
        fail(f"get_config() must return a dict, got {type(config).__name__}")
    vocab = int(config.get("vocab_size", 0))
    if vocab <= 0:
        fail("get_config() has no positive vocab_size")
    ids = np.random.default_rng(0).integers(0, vocab, size=(batch, seq_len), dtype=np.int64)
    logits = adapter.forward(ids)
    if logits.shape != (batch, seq_len, vocab):
        fail(f"forward() gave shape {logits.shape}, expected {(batch, seq_len, vocab)}")
    if logits.dtype != np.float32 or not np.isfinite(logits).all():
        fail("forward() must give finite float32 logits")
    masked = adapter.forward(ids, attention_mask=np.ones_like(ids))
    if not np.allclose(masked, logits, atol=1e-5):
        fail("forward() with an all-ones attention_mask differs from no mask")

    params = list(adapter.parameters())
    total = sum(int(np.asarray(a).size) for _, a in params)
    if total != adapter.get_num_parameters():
        fail(f"get_num_parameters() = {adapter.get_num_parameters()} but parameters() hold {total}")

    with tempfile.TemporaryDirectory() as tmp:
        adapter.save_checkpoint(Path(tmp))
        clone = type(adapter)(None)
        clone.load_checkpoint(Path(tmp))
        again = clone.forward(ids)
        if not np.array_equal(again, logits):
            fail(f"save/load round trip changed the logits (max diff {np.abs(again - logits).max():.3g})")
        if clone.get_architecture_type() != arch:
            fail("architecture type changed across save/load")
    return {"architecture_type": arch, "parameters": total, "logits_shape": tuple(logits.shape)}

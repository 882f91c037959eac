"""`Trainer`: one optimisation step at a time (forward, loss, backward, clipping and the
AdamW update all run in Rust)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from metalcandle import _core
from metalcandle.checkpoint import read_json, write_json_atomic
from metalcandle.model import Model, as_ids
from metalcandle.optim import Optimizer


@dataclass(frozen=True)
class StepStats:
    loss: float
    grad_norm: float
    """Total gradient norm before clipping."""
    tokens: int
    """Label tokens the loss averaged over."""
    aux: dict = field(default_factory=dict)
    """Each auxiliary loss (hooks), unweighted; `loss` is the main loss alone."""


def _micro_batches(name, value, like=None):
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    arrays = [as_ids(name, v) for v in items]
    if like is not None and len(arrays) != len(like):
        raise ValueError(f"{name} lists {len(arrays)} micro-batches, input_ids {len(like)}")
    return arrays


def _inputs(input_ids, labels, attention_mask):
    """(ids, labels, mask) as lists of micro-batches; labels default to the ids."""
    ids = _micro_batches("input_ids", input_ids)
    labs = _micro_batches("labels", labels if labels is not None else ids, ids)
    return ids, labs, _micro_batches("attention_mask", attention_mask, ids)


class Trainer:
    """Trains the attached LoRA adapter if there is one, else every parameter of the model.

    `step(input_ids, labels=...)` follows the Hugging Face convention: labels are shifted inside,
    -100 marks positions without loss, and the loss is the mean over label tokens. Passing lists
    of arrays accumulates gradients over micro-batches, each weighted by its share of the label
    tokens, so the step equals one step on the concatenated batch.

    `fused=True` runs the step on the fused CPU path when the model allows it (f32 on the CPU,
    no LoRA adapter, no hook or auxiliary loss, no gradient transform); otherwise, or with
    `fused=False`, on the composed per-op path. `last_step_path` says which one ran ("fused" or
    "composed") and `last_composed_reason` why the fused one did not.

    `gradient_checkpointing=True` keeps only each block's input and recomputes the block in the
    backward: less memory, the same arithmetic (identical trajectories). The composed path
    ignores it (with a one-time warning)."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        fused: bool = True,
    ):
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.fused = bool(fused)
        self.step_count = 0
        self.last_step_path: str | None = None
        self.last_composed_reason: str | None = None
        self._warned_checkpointing = False

    def step(self, input_ids, labels=None, attention_mask=None) -> StepStats:
        ids, labs, mask = _inputs(input_ids, labels, attention_mask)
        loss, norm, tokens, aux, path, why = _core.train_step(
            self.model._core,
            self.optimizer._core,
            ids,
            labs,
            mask,
            self.max_grad_norm,
            fused=self.fused,
            gradient_checkpointing=self.gradient_checkpointing,
        )
        self.last_step_path, self.last_composed_reason = path, why
        if path == "composed" and self.gradient_checkpointing and not self._warned_checkpointing:
            warnings.warn(f"gradient_checkpointing is ignored on the composed path ({why})", stacklevel=2)
            self._warned_checkpointing = True
        self.step_count += 1
        return StepStats(loss=loss, grad_norm=norm, tokens=tokens, aux=dict(aux))

    def eval_loss(self, input_ids, labels=None, attention_mask=None) -> float:
        return _core.eval_loss(self.model._core, *_inputs(input_ids, labels, attention_mask))

    def save_state(self, path) -> None:
        """Optimizer moments and step counters (the weights are saved separately)."""
        os.makedirs(path, exist_ok=True)
        self.optimizer.save_state(path)
        state = {"step_count": self.step_count, "max_grad_norm": self.max_grad_norm}
        write_json_atomic(Path(path) / "trainer.json", state)

    def load_state(self, path) -> None:
        self.optimizer.load_state(path)
        self.step_count = int(read_json(Path(path) / "trainer.json")["step_count"])


__all__ = ["Trainer", "StepStats"]

"""`Trainer`: one optimisation step at a time (forward, loss, backward, clipping and the
AdamW update all run in Rust)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from metalcandle import _core
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


class Trainer:
    """Trains the attached LoRA adapter if there is one, else every parameter of the model.

    `step(input_ids, labels=...)` follows the Hugging Face convention: labels are shifted inside,
    -100 marks positions without loss, and the loss is the mean over label tokens. Passing lists
    of arrays accumulates gradients over micro-batches, each weighted by its share of the label
    tokens, so the step equals one step on the concatenated batch."""

    def __init__(self, model: Model, optimizer: Optimizer, max_grad_norm: float | None = 1.0):
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.step_count = 0

    def step(self, input_ids, labels=None, attention_mask=None) -> StepStats:
        ids = _micro_batches("input_ids", input_ids)
        labs = _micro_batches("labels", labels if labels is not None else ids, ids)
        mask = _micro_batches("attention_mask", attention_mask, ids)
        loss, norm, tokens, aux = _core.train_step(
            self.model._core, self.optimizer._core, ids, labs, mask, self.max_grad_norm
        )
        self.step_count += 1
        return StepStats(loss=loss, grad_norm=norm, tokens=tokens, aux=dict(aux))

    def eval_loss(self, input_ids, labels=None, attention_mask=None) -> float:
        ids = _micro_batches("input_ids", input_ids)
        labs = _micro_batches("labels", labels if labels is not None else ids, ids)
        mask = _micro_batches("attention_mask", attention_mask, ids)
        return _core.eval_loss(self.model._core, ids, labs, mask)

    def save_state(self, path) -> None:
        """Optimizer moments and step counters (the weights are saved separately)."""
        os.makedirs(path, exist_ok=True)
        self.optimizer.save_state(path)
        tmp = os.path.join(path, ".trainer.json.tmp")
        with open(tmp, "w") as f:
            json.dump({"step_count": self.step_count, "max_grad_norm": self.max_grad_norm}, f)
        os.replace(tmp, os.path.join(path, "trainer.json"))

    def load_state(self, path) -> None:
        self.optimizer.load_state(path)
        with open(os.path.join(path, "trainer.json")) as f:
            state = json.load(f)
        self.step_count = int(state["step_count"])


__all__ = ["Trainer", "StepStats"]

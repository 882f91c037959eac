"""`Trainer`: one optimisation step at a time (forward, loss, backward, clipping and the
AdamW update all run in Rust)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metalcandle import _core
from metalcandle.checkpoint import read_json, write_json_atomic
from metalcandle.model import Model, as_ids, check_mask
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


def _inputs(input_ids, labels, attention_mask, targets=None):
    """(ids, labels, mask, pre_shifted) as lists of micro-batches; labels default to the ids.
    `targets` are labels already shifted (position t predicts targets[t])."""
    if targets is not None and labels is not None:
        raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
    ids = _micro_batches("input_ids", input_ids)
    name, given = ("targets", targets) if targets is not None else ("labels", labels)
    labs = _micro_batches(name, given if given is not None else ids, ids)
    masks = _micro_batches("attention_mask", attention_mask, ids)
    for m in masks or []:
        check_mask(m)
    return ids, labs, masks, targets is not None


def _check_labels(model: Model, labels: list[np.ndarray]) -> None:
    """Labels are token ids or -100 (no loss); checked here so a bad one is a ValueError like
    forward's, not an error from inside the loss."""
    vocab = model.vocab_size
    for i, lab in enumerate(labels):
        bad = (lab != -100) & ((lab < 0) | (lab >= vocab))
        if bad.any():
            at = tuple(int(x) for x in np.argwhere(bad)[0])
            where = f"labels[{i}]{list(at)}" if len(labels) > 1 else f"labels{list(at)}"
            raise ValueError(f"{where} = {lab[at]} is outside the vocabulary [0, {vocab}) and not -100")


class Trainer:
    """Trains the attached LoRA adapter if there is one, else every parameter of the model.

    `step(input_ids, labels=...)` follows the Hugging Face convention: labels are shifted inside,
    -100 marks positions without loss, and the loss is the mean over label tokens. Passing lists
    of arrays accumulates gradients over micro-batches, each weighted by its share of the label
    tokens, so the step equals one step on the concatenated batch."""

    def __init__(self, model: Model, optimizer: Optimizer, max_grad_norm: float | None = 1.0):
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.step_count = 0

    def step(self, input_ids, labels=None, attention_mask=None, targets=None) -> StepStats:
        ids, labs, mask, pre_shifted = _inputs(input_ids, labels, attention_mask, targets)
        _check_labels(self.model, labs)
        loss, norm, tokens, aux = _core.train_step(
            self.model._core, self.optimizer._core, ids, labs, mask, self.max_grad_norm, pre_shifted
        )
        self.step_count += 1
        return StepStats(loss=loss, grad_norm=norm, tokens=tokens, aux=dict(aux))

    def eval_loss(self, input_ids, labels=None, attention_mask=None, targets=None) -> float:
        ids, labs, mask, pre_shifted = _inputs(input_ids, labels, attention_mask, targets)
        _check_labels(self.model, labs)
        return _core.eval_loss(self.model._core, ids, labs, mask, pre_shifted)

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

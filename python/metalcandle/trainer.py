"""`Trainer`: one optimisation step at a time (forward, loss, backward, clipping and the
AdamW update all run in Rust).

This module is the binding of the core's step: it alone hands `Model._core` and
`Optimizer._core` to `_core.train_step` / `_core.eval_loss`, so nothing else needs them."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metalcandle import _core
from metalcandle.checkpoint import read_json, write_json_atomic
from metalcandle.distributed import as_distributed, rank_slice
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
    tokens, so the step equals one step on the concatenated batch.

    With `comm` (`metalcandle.distributed.init()`, or an mpi4py communicator) every rank passes
    the same global batches: each trains on its slice of the rows (a batch must split evenly over
    the ranks), the gradients are summed over the ranks, and every rank takes the step one process
    takes on the whole batch. The trainable weights are taken from rank 0 when the Trainer is made,
    so every rank starts identical.

    `fused=True` runs the step on the fused CPU path when the model allows it (f32 on the CPU,
    no LoRA dropout or merged adapter, no hook inside a block or at the logits, no auxiliary loss
    or gradient transform); otherwise, or with
    `fused=False`, on the composed per-op path. `last_step_path` says which one ran ("fused" or
    "composed") and `last_composed_reason` why the fused one did not.

    `gradient_checkpointing=True` keeps only each block's input and recomputes the block in the
    backward: less memory, the same arithmetic (identical trajectories). The composed path
    ignores it (with a one-time warning).

    A spec with `dropout` > 0 drops at its rate while training only (never in `eval_loss`,
    generation or `forward`). Its masks are a function of `seed`, the optimizer's step count, the
    micro-batch and each row's place in the global batch, so a resumed run draws exactly the masks
    an uninterrupted one does, and N ranks the masks of one process."""

    def __init__(
        self,
        model: Model,
        optimizer: Optimizer,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        fused: bool = True,
        comm=None,
        seed: int = 0,
    ):
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
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
        self.dist = as_distributed(comm)
        self.dropout_seed = int(seed) % 2**64
        if self.parallel:
            self.broadcast_weights()

    @property
    def parallel(self) -> bool:
        return self.dist is not None and self.dist.size > 1

    def broadcast_weights(self) -> None:
        """Rank 0's trainable weights (all parameters, or the adapter) on every rank."""
        synced = self.dist.broadcast_arrays(self.model.trainable_parameters())
        if not self.dist.is_main:
            self.model._core.set_trainable_parameters(synced)

    def step(self, input_ids, labels=None, attention_mask=None, targets=None) -> StepStats:
        ids, labs, mask, pre_shifted = _inputs(input_ids, labels, attention_mask, targets)
        _check_labels(self.model, labs)
        allreduce, first_rows = None, []
        if self.parallel:
            rows = [rank_slice(len(a), self.dist, "the batch") for a in ids]
            first_rows = [r.start for r in rows]
            ids = [a[r] for a, r in zip(ids, rows, strict=True)]
            labs = [a[r] for a, r in zip(labs, rows, strict=True)]
            mask = None if mask is None else [a[r] for a, r in zip(mask, rows, strict=True)]
            allreduce = self.dist.allreduce
        loss, norm, tokens, aux, path, why = _core.train_step(
            self.model._core,
            self.optimizer._core,
            ids,
            labs,
            mask,
            self.max_grad_norm,
            pre_shifted,
            allreduce,
            fused=self.fused,
            gradient_checkpointing=self.gradient_checkpointing,
            dropout_seed=self.dropout_seed,
            first_rows=first_rows,
        )
        self.last_step_path, self.last_composed_reason = path, why
        if path == "composed" and self.gradient_checkpointing and not self._warned_checkpointing:
            warnings.warn(f"gradient_checkpointing is ignored on the composed path ({why})", stacklevel=2)
            self._warned_checkpointing = True
        self.step_count += 1
        return StepStats(loss=loss, grad_norm=norm, tokens=tokens, aux=dict(aux))

    def eval_loss(self, input_ids, labels=None, attention_mask=None, targets=None) -> float:
        """The mean loss over the label tokens, without gradients (a list of arrays: over all of them)."""
        ids, labs, mask, pre_shifted = _inputs(input_ids, labels, attention_mask, targets)
        return self._mean_loss(ids, labs, mask, pre_shifted)[0]

    def evaluate(self, batches, targets: bool = False) -> tuple[float, int]:
        """The mean loss over every label token of `batches`, (input_ids, labels) pairs (or
        (input_ids, targets) with `targets`), and how many tokens it averaged."""
        batches = list(batches)
        ids, given = [b[0] for b in batches], [b[1] for b in batches]
        ids, labs, mask, pre_shifted = _inputs(
            ids, None if targets else given, None, given if targets else None
        )
        return self._mean_loss(ids, labs, mask, pre_shifted)

    def _mean_loss(self, ids, labs, mask, pre_shifted) -> tuple[float, int]:
        _check_labels(self.model, labs)
        if self.parallel:
            # Each rank evaluates a part of every batch's rows; the summed losses are added up.
            parts = [np.array_split(np.arange(len(a)), self.dist.size)[self.dist.rank] for a in ids]
            keep = [i for i, p in enumerate(parts) if len(p)]
            ids = [ids[i][parts[i]] for i in keep]
            labs = [labs[i][parts[i]] for i in keep]
            mask = None if mask is None else [mask[i][parts[i]] for i in keep]
        total = np.zeros(2)
        if ids:
            total[:] = _core.eval_loss(self.model._core, ids, labs, mask, pre_shifted)
        if self.parallel:
            self.dist.allreduce(total)
        if total[1] == 0:
            raise ValueError("no label tokens to evaluate (all labels are -100)")
        return float(total[0] / total[1]), int(total[1])

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

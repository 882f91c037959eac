"""A training loop as two functions, for scripts and notebooks: `train_epoch` runs one pass over
(x, y) batches, `train_model` trains a model on text files for some epochs with validation,
checkpoints and resume. `metalcandle train` is the config-driven loop with the same steps."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

from metalcandle import checkpoint as ck
from metalcandle.schedule import lr_at
from metalcandle.text_dataset import TextDataset
from metalcandle.trainer import Trainer

HISTORY_FILE = "history.json"


def _trainer(model, optimizer, clip_grad_norm) -> Trainer:
    return Trainer(model, optimizer, max_grad_norm=clip_grad_norm or None)


def train_epoch(
    model, batches: Iterable, optimizer, clip_grad_norm: float | None = 1.0, trainer=None
) -> float:
    """One optimizer step per (x, y) batch; returns the mean loss over the epoch's target tokens."""
    trainer = trainer or _trainer(model, optimizer, clip_grad_norm)
    total, count = 0.0, 0
    for x, y in batches:
        stats = trainer.step(x, targets=y)
        total += stats.loss * stats.tokens
        count += stats.tokens
    if count == 0:
        raise ValueError("train_epoch got no batches with a target token")
    return total / count


def evaluate(model, batches: Iterable) -> float:
    """Mean loss over the target tokens of (x, y) batches, without gradients."""
    return _trainer(model, None, None).evaluate(batches, targets=True)[0]


def train_model(
    model,
    tokenizer,
    sources,
    epochs: int = 1,
    *,
    valid_sources=None,
    seq_len: int | None = None,
    batch_size: int = 8,
    optimizer=None,
    lr: float = 3e-4,
    weight_decay: float = 0.01,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    clip_grad_norm: float | None = 1.0,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    callback=None,
) -> dict:
    """Trains `model` on `sources` (text or jsonl files) for `epochs`, shuffling each epoch by
    (seed, epoch). Returns the history: `train_loss` and `val_loss` per epoch, `step_loss` per step.

    With `checkpoint_dir`, the model, optimizer state and history are saved there after every epoch
    (atomically), and a later call with `resume=True` continues after the last saved epoch, exactly
    as if it had not stopped. `callback(epoch, history)` runs after each epoch."""
    import metalcandle as mc

    seq_len = seq_len or min(256, model.max_position_embeddings)
    train = TextDataset(sources, tokenizer, seq_len)
    valid = TextDataset(valid_sources, tokenizer, seq_len) if valid_sources is not None else None
    optimizer = optimizer or mc.AdamW(lr=lr, weight_decay=weight_decay)
    trainer = _trainer(model, optimizer, clip_grad_norm)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total_steps = steps_per_epoch * epochs
    history = {"train_loss": [], "val_loss": [], "step_loss": [], "epochs_done": 0}
    base_lr = optimizer.lr  # before a resume: the saved optimizer state holds the last scheduled rate
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None and resume and (folder / HISTORY_FILE).is_file():
        history = ck.read_json(folder / HISTORY_FILE)
        if model.has_adapter:
            model.load_adapter(folder)
        else:  # the saved weights, in the caller's Model object
            model.load_weights(folder)
        trainer.load_state(folder / ck.TRAINER_DIR)
    for epoch in range(history["epochs_done"], epochs):
        total, count = 0.0, 0
        for x, y in train.batches(batch_size, shuffle=True, seed=seed * 1_000_003 + epoch):
            optimizer.lr = lr_at(
                trainer.step_count + 1, base_lr, schedule, warmup_steps, total_steps, min_lr_ratio
            )
            stats = trainer.step(x, targets=y)
            history["step_loss"].append(stats.loss)
            total += stats.loss * stats.tokens
            count += stats.tokens
        history["train_loss"].append(total / max(count, 1))
        if valid is not None:
            history["val_loss"].append(evaluate(model, valid.batches(batch_size, shuffle=False)))
        history["epochs_done"] = epoch + 1
        if folder is not None:
            _save(folder, model, tokenizer, trainer, history)
        if callback is not None:
            callback(epoch, history)
    optimizer.lr = base_lr
    return history


def _save(folder: Path, model, tokenizer, trainer: Trainer, history: dict) -> None:
    def write(tmp: Path):
        if model.has_adapter:
            model.save_adapter(tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
        trainer.save_state(tmp / ck.TRAINER_DIR)
        ck.write_json(tmp / HISTORY_FILE, history)

    ck.write_atomic_dir(folder, write)


__all__ = ["train_epoch", "train_model", "evaluate"]

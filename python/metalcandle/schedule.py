"""Learning-rate schedules, computed in Python and written to `opt.lr` before every step."""

from __future__ import annotations

import math


def lr_at(
    step: int, base_lr: float, name: str, warmup_steps: int, max_steps: int, min_lr_ratio: float
) -> float:
    """The learning rate for optimizer step `step` (1-based).

    Warmup rises linearly to `base_lr` over `warmup_steps` (step 1 already gets a non-zero rate),
    then "constant" stays, "linear" falls linearly and "cosine" follows half a cosine, both to
    `min_lr_ratio * base_lr` at `max_steps`."""
    if warmup_steps > 0 and step <= warmup_steps:
        return base_lr * step / warmup_steps
    if name == "constant":
        return base_lr
    floor = base_lr * min_lr_ratio
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if name == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    if name == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {name!r}")

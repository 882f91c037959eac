"""Optimizers. The update itself runs in Rust; this is its Python face."""

from __future__ import annotations

import json
from collections.abc import Sequence

from metalcandle import _core


class AdamW:
    """AdamW with torch's semantics (per-parameter step counts, bias correction, decoupled
    weight decay). Like `torch.optim.AdamW(model.parameters())`, weight decay applies to every
    trainable parameter unless `no_decay` lists name substrings to exempt, e.g.
    `no_decay=["bias", "norm"]`."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        no_decay: Sequence[str] | None = None,
    ):
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        self._core = _core.AdamW(
            float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), list(no_decay or [])
        )

    @property
    def lr(self) -> float:
        return self._core.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._core.lr = float(value)

    @property
    def config(self) -> dict:
        return json.loads(self._core.config_json())

    def steps(self) -> dict[str, int]:
        """How many updates each parameter has received."""
        return self._core.steps()

    def save_state(self, path) -> None:
        self._core.save(str(path))

    def load_state(self, path) -> None:
        self._core.load(str(path))

    def __repr__(self) -> str:
        return f"AdamW({self.config})"

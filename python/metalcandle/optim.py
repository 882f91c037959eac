"""Optimizers. The update itself runs in Rust; these are its Python faces. Each follows torch's
semantics (per-parameter step counts; parameters without a gradient are left alone) and saves
and loads its state exactly."""

from __future__ import annotations

from collections.abc import Sequence

from metalcandle import _core


class Optimizer:
    """What the optimizers share: the learning rate (the scheduler sets it), the config, per-
    parameter step counts and the state on disk. `no_decay` lists name substrings exempt from
    weight decay, e.g. `no_decay=["bias", "norm"]`."""

    def __init__(
        self,
        algorithm: str,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_decay: Sequence[str] | None = None,
        momentum: float = 0.0,
        nesterov: bool = False,
    ):
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair, got {betas!r}")
        self._core = _core.Optimizer(
            algorithm,
            float(lr),
            float(betas[0]),
            float(betas[1]),
            float(eps),
            float(weight_decay),
            list(no_decay or []),
            float(momentum),
            bool(nesterov),
        )

    @property
    def lr(self) -> float:
        return self._core.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._core.lr = float(value)

    @property
    def config(self) -> dict:
        return self._core.config()

    def steps(self) -> dict[str, int]:
        """How many updates each parameter has received."""
        return self._core.steps()

    def save_state(self, path) -> None:
        self._core.save(str(path))

    def load_state(self, path) -> None:
        self._core.load(str(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class AdamW(Optimizer):
    """AdamW with torch's semantics (bias correction, decoupled weight decay). Like
    `torch.optim.AdamW(model.parameters())`, weight decay applies to every trainable parameter
    unless `no_decay` exempts names."""

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        no_decay: Sequence[str] | None = None,
    ):
        super().__init__("adamw", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, no_decay=no_decay)


class SGD(Optimizer):
    """`torch.optim.SGD` (dampening 0): L2 weight decay added to the gradient, heavy-ball
    momentum, optionally Nesterov's."""

    def __init__(
        self,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        no_decay: Sequence[str] | None = None,
    ):
        super().__init__(
            "sgd", lr=lr, weight_decay=weight_decay, no_decay=no_decay, momentum=momentum, nesterov=nesterov
        )


class Lion(Optimizer):
    """Lion (Chen et al., 2023): `p -= lr * sign(b1*m + (1-b1)*g)`, then `m = b2*m + (1-b2)*g`,
    with decoupled weight decay. Its updates are larger per entry than AdamW's: the usual lr is
    3-10x smaller and weight decay 3-10x larger."""

    def __init__(
        self,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        no_decay: Sequence[str] | None = None,
    ):
        super().__init__("lion", lr=lr, betas=betas, weight_decay=weight_decay, no_decay=no_decay)


__all__ = ["AdamW", "Lion", "Optimizer", "SGD"]

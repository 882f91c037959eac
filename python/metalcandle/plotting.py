"""Loss-curve PNGs from `metrics.jsonl`: one run's at the end of training, two runs' for
`metalcandle compare`."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, valid = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row:
            train.append((row["step"], row["loss"]))
        if "val_loss" in row:
            valid.append((row["step"], row["val_loss"]))
    return train, valid


def plot_loss(metrics_file: Path, png: Path, title: str = "") -> Path:
    return plot_runs([("", metrics_file)], png, title)


def plot_runs(runs: list[tuple[str, Path]], png: Path, title: str = "") -> Path:
    """Training and validation loss of one or more runs, `(label, metrics.jsonl)`, on one chart;
    each run in its own color, validation as markers on a dashed line."""
    # Agg: no display is needed (servers, CI); set before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, (label, metrics_file) in enumerate(runs):
        train, valid = read_metrics(metrics_file)
        prefix = f"{label}: " if label else ""
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=f"{prefix}train loss", linewidth=1)
        if valid:
            ax.plot(
                *zip(*valid, strict=True),
                "o--" if len(runs) > 1 else "o-",
                color=f"C{(i + 1) % 10}" if len(runs) == 1 else color,
                label=f"{prefix}validation loss",
                linewidth=1.5,
                markersize=3,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png

"""The loss-curve PNG written at the end of a run, from `metrics.jsonl`."""

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
    # Agg: no display is needed (servers, CI); set before pyplot is imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = read_metrics(metrics_file)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png

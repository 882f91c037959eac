"""`TextDataset`: nanoGPT-style (x, y) windows over tokenized files, y being x moved one token on."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from metalcandle import data as D


class TextDataset:
    """Every `sources` file (.txt, or .jsonl in any format `metalcandle train` reads: {"text"},
    {"prompt", "completion"}, {"messages"}) tokenized and joined into one stream, eos after each
    document, cut into windows of `seq_len` tokens every `stride` tokens (default: no overlap).

    `dataset[i]` is `(x, y)`, two int64 arrays of `seq_len`: y[t] is the token after x[t], or -100
    where it must not be learned (a prompt with `mask_prompt`). `batches()` gives them stacked,
    shuffled by `seed` (the same seed, the same order)."""

    def __init__(
        self,
        sources,
        tokenizer,
        seq_len: int,
        *,
        format: str = "auto",
        mask_prompt: bool = True,
        stride: int | None = None,
    ):
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        stride = seq_len if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride!r}")
        files = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
        if not files:
            raise ValueError("TextDataset needs at least one source file")
        examples = D.read_examples([Path(f) for f in files], format, tokenizer, mask_prompt)
        self.ids = np.array([t for e in examples for t in e.ids], dtype=np.int64)
        self.labels = np.array([t for e in examples for t in e.labels], dtype=np.int64)
        self.seq_len, self.stride = seq_len, stride
        # A window needs seq_len inputs and the token after the last of them.
        self._starts = np.arange(0, max(0, len(self.ids) - seq_len), stride)
        if len(self._starts) == 0:
            raise ValueError(
                f"{', '.join(str(f) for f in files)}: {len(self.ids)} tokens are too few for one window "
                f"of seq_len {seq_len} (it needs {seq_len + 1})"
            )

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} of a TextDataset of {len(self)}")
        s = int(self._starts[i])
        return self.ids[s : s + self.seq_len], self.labels[s + 1 : s + 1 + self.seq_len]

    def batches(
        self, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of [batch_size, seq_len] each; the last batch is smaller unless `drop_last`."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                return
            rows = [self[int(i)] for i in idx]
            yield np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


__all__ = ["TextDataset"]

"""Training data: files to token examples, examples to fixed-length windows, windows to batches.

Labels follow the Hugging Face convention: `labels` is aligned with `input_ids` and the Trainer
shifts it, so a window of T tokens trains T-1 next-token predictions. Positions that must not be
learned (prompt tokens with `mask_prompt`, padding) carry -100.

Shuffling is a pure function of (seed, epoch), so the data-order state of a run is one integer —
how many windows it has consumed — and resuming from it replays exactly the same batches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metalcandle.errors import UserError

IGNORE = -100
FORMATS = ("text", "completions", "chat")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


@dataclass
class Windows:
    """Fixed-length rows: input_ids and labels, both int64 [N, seq_len]."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def take(self, idx: np.ndarray) -> Windows:
        return Windows(self.input_ids[idx], self.labels[idx])

    @property
    def num_tokens(self) -> int:
        """Trained target positions (after the shift), the denominator of the mean loss."""
        return int((self.labels[:, 1:] != IGNORE).sum())


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})"
        ) from None


CHAT_ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    rows = []
    # Split on "\n" only: JSON strings may hold other line separators (U+2028) literally.
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows


def detect_format(path: Path, rows: list | None) -> str:
    """text for .txt; for .jsonl the keys of the first object decide."""
    if rows is None:
        return "text"
    if not rows:
        raise UserError(f"{path}: no JSON lines")
    keys = rows[0][1].keys()
    if "messages" in keys:
        return "chat"
    if "prompt" in keys and "completion" in keys:
        return "completions"
    if "text" in keys:
        return "text"
    raise UserError(
        f"{path}:{rows[0][0]}: cannot tell the format from keys {sorted(keys)}; expected "
        '"text", "prompt" + "completion", or "messages"'
    )


def _field(path: Path, lineno: int, obj: dict, key: str, kind=str):
    if key not in obj:
        raise UserError(f"{path}:{lineno}: missing key '{key}'")
    if not isinstance(obj[key], kind):
        raise UserError(f"{path}:{lineno}: '{key}' must be a {kind.__name__}")
    return obj[key]


def _eos(tokenizer) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


def text_example(tokenizer, text: str) -> Example:
    ids = list(tokenizer.encode(text)) + _eos(tokenizer)
    return Example(ids, list(ids))


def completion_example(tokenizer, prompt: str, completion: str, mask_prompt: bool) -> Example:
    p = list(tokenizer.encode(prompt))
    c = list(tokenizer.encode(completion)) + _eos(tokenizer)
    return Example(p + c, ([IGNORE] * len(p) if mask_prompt else p) + c)


def render_chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def chat_example(tokenizer, messages: list[dict], mask_prompt: bool) -> Example:
    """The conversation rendered with the tokenizer's chat template. With mask_prompt only the
    assistant turns are learned: each assistant turn is the text between the rendering of the
    conversation before it (with the generation prompt) and the rendering including it. The
    pieces are encoded separately, which is how generation sees them too."""
    full = render_chat(tokenizer, messages, add_generation_prompt=False)
    if not mask_prompt:
        ids = list(tokenizer.encode(full))
        return Example(ids, list(ids))
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # characters of `full` already encoded
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(prefix) and len(prefix) >= done):
            # A template that rewrites earlier turns: fall back to learning everything.
            ids = list(tokenizer.encode(full))
            return Example(ids, list(ids))
        masked = list(tokenizer.encode(full[done : len(prefix)])) if len(prefix) > done else []
        learned = list(tokenizer.encode(upto[len(prefix) :]))
        ids += masked + learned
        labels += [IGNORE] * len(masked) + learned
        done = len(upto)
    if done < len(full):  # trailing text after the last assistant turn is context only
        rest = list(tokenizer.encode(full[done:]))
        ids += rest
        labels += [IGNORE] * len(rest)
    return Example(ids, labels)


def read_examples(paths: list[Path], fmt: str, tokenizer, mask_prompt: bool) -> list[Example]:
    """Every file as token examples; `fmt` "auto" picks text/completions/chat per file."""
    examples: list[Example] = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        rows = read_jsonl(path) if path.suffix == ".jsonl" else None
        if rows is None and path.suffix not in (".txt", ".text", ".md", ""):
            raise UserError(f"{path}: unsupported data file type '{path.suffix}' (expected .txt or .jsonl)")
        kind = detect_format(path, rows) if fmt == "auto" else fmt
        if rows is None:
            if kind != "text":
                raise UserError(f"{path}: data.format = {kind!r} needs a .jsonl file")
            examples.append(text_example(tokenizer, _read_text(path)))
            continue
        for lineno, obj in rows:
            if kind == "text":
                examples.append(text_example(tokenizer, _field(path, lineno, obj, "text")))
            elif kind == "completions":
                prompt = _field(path, lineno, obj, "prompt")
                completion = _field(path, lineno, obj, "completion")
                examples.append(completion_example(tokenizer, prompt, completion, mask_prompt))
            else:
                messages = _field(path, lineno, obj, "messages", list)
                for m in messages:
                    if not isinstance(m, dict) or "role" not in m or "content" not in m:
                        raise UserError(f"{path}:{lineno}: each message needs 'role' and 'content'")
                    if m["role"] not in CHAT_ROLES:
                        raise UserError(
                            f"{path}:{lineno}: message role {m['role']!r} is not one of "
                            + ", ".join(CHAT_ROLES)
                        )
                    if not isinstance(m["content"], str):
                        raise UserError(f"{path}:{lineno}: message content must be a string")
                if getattr(tokenizer, "chat_template", None) is None:
                    raise UserError(
                        f"{path}: chat rows ('messages') need a tokenizer with a chat template; "
                        "this one has none (use text or prompt/completion rows)"
                    )
                examples.append(chat_example(tokenizer, messages, mask_prompt))
    return examples


def build_windows(examples: list[Example], seq_len: int, packing: bool, pad_id: int) -> Windows:
    """Rows of `seq_len` tokens. Packing concatenates all examples and cuts the stream (the last
    partial window is padded); without packing each example starts its own row(s). Padding is at
    the right with label -100, which a causal model never attends to from real tokens."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    if packing:
        streams = [
            (
                [t for e in examples for t in e.ids],
                [t for e in examples for t in e.labels],
            )
        ]
    else:
        streams = [(e.ids, e.labels) for e in examples]
    rows_ids, rows_labels = [], []
    for ids, labels in streams:
        for start in range(0, len(ids), seq_len):
            chunk, lab = ids[start : start + seq_len], labels[start : start + seq_len]
            if len(chunk) < 2:
                continue  # nothing to predict
            pad = seq_len - len(chunk)
            rows_ids.append(list(chunk) + [pad_id] * pad)
            rows_labels.append(list(lab) + [IGNORE] * pad)
    ids_arr = np.array(rows_ids, dtype=np.int64).reshape(-1, seq_len)
    lab_arr = np.array(rows_labels, dtype=np.int64).reshape(-1, seq_len)
    # Windows whose every target is masked teach nothing and would divide by zero tokens.
    keep = (lab_arr[:, 1:] != IGNORE).any(axis=1)
    return Windows(ids_arr[keep], lab_arr[keep])


def split_windows(windows: Windows, valid_fraction: float, seed: int) -> tuple[Windows, Windows]:
    """A seeded random split of the windows (they do not overlap, so no text is in both)."""
    n = len(windows)
    n_valid = max(1, int(round(n * valid_fraction)))
    if n - n_valid < 1:
        raise UserError(f"not enough data: {n} window(s) cannot be split into training and validation")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return windows.take(np.sort(perm[n_valid:])), windows.take(np.sort(perm[:n_valid]))


class BatchStream:
    """Micro-batches of `batch_size` windows, reshuffled every epoch from (seed, epoch).

    The stream is a function of the global position (windows consumed), so the data-order state
    saved in a checkpoint is that one integer."""

    def __init__(self, windows: Windows, batch_size: int, seed: int):
        if len(windows) == 0:
            raise UserError("no training windows: the training data is empty")
        self.windows = windows
        self.batch_size = batch_size
        self.seed = seed
        self.position = 0
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    @property
    def epoch(self) -> float:
        return self.position / len(self.windows)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.windows)
        idx = []
        for p in range(self.position, self.position + self.batch_size):
            idx.append(self._order(p // n)[p % n])
        self.position += self.batch_size
        w = self.windows.take(np.array(idx))
        return w.input_ids, w.labels


def eval_batches(windows: Windows, batch_size: int, max_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `max_batches` batches in file order: the same windows at every evaluation."""
    out = []
    for start in range(0, min(len(windows), batch_size * max_batches), batch_size):
        w = windows.take(np.arange(start, min(start + batch_size, len(windows))))
        out.append((w.input_ids, w.labels))
    return out


def steps_for_epochs(epochs: float, num_windows: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(epochs * num_windows / (batch_size * grad_accum)))

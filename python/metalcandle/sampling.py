"""Logits processors with Hugging Face semantics, and the next-token distribution a sampler draws from.

Everything runs in float32, in the order and with the tie rules of transformers' processors, so the
removed ids match theirs exactly (a near-threshold id is kept or removed the same way)."""

from __future__ import annotations

import numpy as np


def validate_sampling_args(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None):
    """ValueError with the offending value for options transformers would also reject (or that make no
    sense as a distribution); None always means "not applied"."""
    if temperature is not None and not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_p is not None and not (0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], got {min_p!r}")
    if repetition_penalty is not None and not (np.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0, got {repetition_penalty!r}")


def apply_repetition_penalty(scores: np.ndarray, input_ids, penalty: float | None) -> np.ndarray:
    """HF `RepetitionPenaltyLogitsProcessor`: for every id present in the row's history (prompt included,
    each id once however often it occurs), a score < 0 is multiplied by `penalty`, otherwise divided."""
    if penalty is None or penalty == 1.0:
        return scores
    if input_ids is None:
        raise ValueError("repetition_penalty needs input_ids (the ids already in the sequence)")
    history = np.asarray(input_ids)
    if history.ndim != 2 or history.shape[0] != scores.shape[0]:
        raise ValueError(f"input_ids shape {history.shape} does not match logits shape {scores.shape}")
    out = scores.copy()
    rows = np.arange(scores.shape[0])[:, None]
    seen = scores[rows, history]
    out[rows, history] = np.where(seen < 0, seen * np.float32(penalty), seen / np.float32(penalty))
    return out


def apply_temperature(scores: np.ndarray, temperature: float | None) -> np.ndarray:
    if temperature is None or temperature == 1.0:
        return scores
    return scores / np.float32(temperature)


def apply_top_k(scores: np.ndarray, top_k: int | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF `TopKLogitsWarper`: removes scores strictly below the k-th largest, so ties with it stay."""
    if not top_k:
        return scores
    k = min(max(int(top_k), min_tokens_to_keep), scores.shape[-1])
    kth = -np.sort(-scores, axis=-1)[:, k - 1 : k]
    return np.where(scores < kth, np.float32(-np.inf), scores)


def apply_top_p(scores: np.ndarray, top_p: float | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF `TopPLogitsWarper`: on ascending-sorted probabilities, removes the prefix whose cumulative sum is
    <= 1 - top_p; what remains is the smallest set of most likely ids with mass >= top_p."""
    if top_p is None or top_p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(_softmax(sorted_scores), axis=-1, dtype=np.float32)
    remove_sorted = cumulative <= np.float32(1.0 - top_p)
    remove_sorted[:, -min_tokens_to_keep:] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def apply_min_p(scores: np.ndarray, min_p: float | None, min_tokens_to_keep: int = 1) -> np.ndarray:
    """HF `MinPLogitsWarper`: removes ids whose probability is below min_p times the top probability,
    always keeping the `min_tokens_to_keep` highest-scoring ids."""
    if min_p is None:
        return scores
    probs = _softmax(scores)
    remove = probs < np.float32(min_p) * probs.max(axis=-1, keepdims=True)
    top = np.argsort(-scores, axis=-1, kind="stable")[:, :min_tokens_to_keep]
    np.put_along_axis(remove, top, False, axis=-1)
    return np.where(remove, np.float32(-np.inf), scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted, dtype=np.float32)
    return exp / exp.sum(axis=-1, keepdims=True, dtype=np.float32)


def process_logits(
    logits, input_ids=None, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None
) -> np.ndarray:
    """[B, V] float32 scores after HF's processors in HF's order: repetition penalty, temperature, top-k,
    top-p, min-p. Removed ids are -inf."""
    validate_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    scores = np.asarray(logits, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"logits must be [V] or [B, V], got shape {scores.shape}")
    return _process(scores, input_ids, temperature, top_k, top_p, min_p, repetition_penalty)


def _process(scores, input_ids, temperature, top_k, top_p, min_p, repetition_penalty) -> np.ndarray:
    scores = apply_repetition_penalty(scores, input_ids, repetition_penalty)
    if temperature == 0:
        return _greedy_scores(scores)
    scores = apply_temperature(scores, temperature)
    scores = apply_top_k(scores, top_k)
    scores = apply_top_p(scores, top_p)
    return apply_min_p(scores, min_p)


def _greedy_scores(scores: np.ndarray) -> np.ndarray:
    # Temperature 0 is the limit of sharpening: all mass on the (first) argmax, i.e. greedy decoding.
    out = np.full_like(scores, -np.inf)
    best = scores.argmax(axis=-1)[:, None]
    np.put_along_axis(out, best, 0.0, axis=-1)
    return out


def next_token_probs(
    logits, input_ids, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None
) -> np.ndarray:
    """The distribution a sampler draws the next token from: softmax of the logits after transformers'
    processors (repetition penalty, temperature, top-k, top-p, min-p, in that order), float32.

    `logits` is [V] with `input_ids` [T], or [B, V] with `input_ids` [B, T]; `input_ids` (the ids already
    in the sequence) only matters for the repetition penalty and may be None without one. Removed ids
    have probability exactly 0. None or neutral values (temperature 1, top_k 0, top_p 1) skip a
    processor; temperature 0 puts all mass on the argmax (greedy)."""
    logits = np.asarray(logits)
    single = logits.ndim == 1
    if single:
        logits = logits[None]
        input_ids = None if input_ids is None else np.asarray(input_ids)[None]
    scores = process_logits(logits, input_ids, temperature, top_k, top_p, min_p, repetition_penalty)
    probs = _softmax(scores)
    return probs[0] if single else probs


def batch_probs(
    logits: np.ndarray,
    input_ids,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
) -> np.ndarray:
    """`next_token_probs` for [B, V] logits whose options `validate_sampling_args` has already
    accepted: a decode loop checks its options once, not at every token."""
    scores = np.asarray(logits, dtype=np.float32)
    return _softmax(_process(scores, input_ids, temperature, top_k, top_p, min_p, repetition_penalty))

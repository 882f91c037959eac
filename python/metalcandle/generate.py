"""Text generation: prefill and KV-cached decode steps run in Rust; token choice happens here.

Greedy, sampling and beam search follow `transformers.generate` (option names, processor order, beam
scoring), so the fixture checkpoints give HF's tokens. Batches are left-padded."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from metalcandle.model import as_ids
from metalcandle.sampling import apply_repetition_penalty, batch_probs, validate_sampling_args


@dataclass
class _Plan:
    """A validated generation request: padded prompt, limits, stop ids, and the per-step token chooser."""

    ids: np.ndarray  # [B, T] int64, left-padded
    mask: np.ndarray | None  # [B, T] 0/1, None when nothing is padded
    max_new_tokens: int
    eos: list[int]
    pad_id: int
    pick: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None  # (logits [B,V], seqs [B,t]) -> [B]
    stop_check: Callable[[np.ndarray], np.ndarray] | None = None  # new ids [B, n] -> rows that hit a stop


# --- option handling ------------------------------------------------------------------------------------


def _id_list(value) -> list[int]:
    if value is None:
        return []
    if np.isscalar(value):
        return [int(value)]
    return [int(v) for v in value]


def resolve_eos(model, tokenizer=None, eos_token_id=None) -> list[int]:
    """Stop ids: `eos_token_id` when given (an empty list disables stopping); otherwise the model's
    generation config (a `generation_config` dict on the model if present, else config.json, which HF
    copies into generation_config.json), plus the tokenizer's eos token."""
    if eos_token_id is not None:
        return _id_list(eos_token_id)
    gen_config = getattr(model, "generation_config", None)
    source = gen_config if isinstance(gen_config, dict) and "eos_token_id" in gen_config else model.config
    eos = _id_list(source.get("eos_token_id"))
    tok_eos = None if tokenizer is None else tokenizer.eos_token_id
    if tok_eos is not None and tok_eos not in eos:
        eos.append(tok_eos)
    return eos


def _resolve_pad(model, tokenizer, pad_token_id, eos: list[int]) -> int:
    """HF fills finished rows (and left padding) with pad_token_id, falling back to the first eos id."""
    for candidate in (pad_token_id, None if tokenizer is None else tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    config_pad = model.config.get("pad_token_id")
    if config_pad is not None:
        return int(config_pad)
    return eos[0] if eos else 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
    return ids, mask


def _is_ragged(prompt_ids) -> bool:
    if isinstance(prompt_ids, np.ndarray) or not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
        return False
    if not all(isinstance(r, (list, tuple, np.ndarray)) for r in prompt_ids):
        return False
    return len({len(r) for r in prompt_ids}) > 1


def prepare_prompt(prompt_ids, attention_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray | None]:
    """[B, T] ids plus a left-padding mask (None when no row is padded). Ragged lists of ids are
    left-padded here; an explicit mask must be 0/1 with the zeros on the left."""
    if _is_ragged(prompt_ids):
        if attention_mask is not None:
            raise ValueError("pass either ragged prompt lists or an attention_mask, not both")
        prompt_ids, attention_mask = _left_pad(prompt_ids, pad_id)
    ids = as_ids("prompt_ids", prompt_ids)
    if ids.shape[1] == 0 or ids.shape[0] == 0:
        raise ValueError(f"the prompt is empty (prompt_ids shape {ids.shape}); give at least one token")
    if attention_mask is None:
        return ids, None
    mask = as_ids("attention_mask", attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, prompt_ids {ids.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("attention_mask must be left-padded (zeros before ones in every row) for generation")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"prompt row {int(empty[0])} is empty (all padding)")
    return ids, (None if mask.all() else mask)


def _cap_to_context(model, prompt_len: int, max_new_tokens: int) -> int:
    """Prompts longer than the context are an error; a generation that would run past it stops there
    (with a warning) instead of feeding positions the model has no embedding for."""
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    context = model.max_position_embeddings
    if prompt_len > context:
        raise ValueError(f"the prompt has {prompt_len} tokens, more than the model's context of {context}")
    room = context - prompt_len
    if max_new_tokens > room:
        warnings.warn(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"of {context}; generation stops after {room} new tokens",
            stacklevel=3,
        )
        return room
    return int(max_new_tokens)


def _stop_string_checker(tokenizer, stop_strings) -> Callable[[np.ndarray], np.ndarray] | None:
    """Rows whose generated text (special tokens dropped) contains one of `stop_strings`."""
    stops = _stop_strings_list(stop_strings)
    if not stops:
        return None
    if tokenizer is None:
        raise ValueError("stop_strings needs a tokenizer (pass tokenizer=...) to decode the generated ids")
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")

    def check(new_ids: np.ndarray) -> np.ndarray:
        texts = (tokenizer.decode(row, skip_special_tokens=True) for row in new_ids)
        return np.array([any(s in text for s in stops) for text in texts], dtype=bool)

    return check


def _greedy_picker(repetition_penalty):
    def pick(logits: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        return apply_repetition_penalty(logits, seqs, repetition_penalty).argmax(axis=-1)

    return pick


def _sampling_picker(seed, **warpers):
    rng = np.random.default_rng(seed)

    def pick(logits: np.ndarray, seqs: np.ndarray) -> np.ndarray:
        return sample_rows(batch_probs(logits, seqs, **warpers), rng)

    return pick


def sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One id per row of `probs` [B, V], by inverse CDF on float64 cumulative sums; ids with probability
    0 can never be drawn (they add nothing to the sum, and the search is right-sided)."""
    cdf = np.cumsum(probs.astype(np.float64), axis=-1)
    u = rng.random(probs.shape[0]) * cdf[:, -1]
    picks = (cdf <= u[:, None]).sum(axis=-1)  # searchsorted(side="right"), row by row
    # u can round up to the total; the last id with mass then takes it, never a zero-probability one.
    last_nonzero = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)
    return np.minimum(picks, last_nonzero).astype(np.int64)


# --- the decode loop --------------------------------------------------------------------------------------


class _CachedRunner:
    """A KV cache with the attention mask and positions HF uses for left-padded batches:
    the mask covers cached + new tokens, positions are cumsum(mask) - 1 clamped at 0."""

    def __init__(self, model, mask: np.ndarray | None):
        self._core = model._core
        self.cache = self._core.new_cache()
        self.mask = mask

    def run(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.mask is None:
            return self._core.forward_cached(ids, self.cache)
        if self.cache.seq_len > 0:
            self.mask = np.concatenate([self.mask, np.ones_like(ids)], axis=1)
        positions = np.maximum(np.cumsum(self.mask, axis=1) - 1, 0)[:, -ids.shape[1] :]
        return self._core.forward_cached(
            ids, self.cache, np.ascontiguousarray(self.mask), np.ascontiguousarray(positions)
        )

    def select(self, rows: np.ndarray) -> None:
        """Reorders / duplicates batch rows (beams) of the cache and the mask."""
        self.cache.select_rows([int(r) for r in rows])
        if self.mask is not None:
            self.mask = self.mask[rows]


def _token_columns(model, plan: _Plan) -> Iterator[np.ndarray]:
    """Greedy or sampled decoding: yields the new token of every row, step by step. Rows that finished
    (eos or stop string) get `pad_id` from then on; the loop ends when all rows finished."""
    runner = _CachedRunner(model, plan.mask)
    batch, prompt_len = plan.ids.shape
    # Room for every new id up front: a step writes one column instead of copying all sequences.
    seqs = np.empty((batch, prompt_len + plan.max_new_tokens), dtype=np.int64)
    seqs[:, :prompt_len] = plan.ids
    done = np.zeros(batch, dtype=bool)
    logits = runner.run(plan.ids) if plan.max_new_tokens else None
    for step in range(plan.max_new_tokens):
        length = prompt_len + step
        nxt = np.where(done, plan.pad_id, plan.pick(logits, seqs[:, :length])).astype(np.int64)
        seqs[:, length] = nxt
        if plan.eos:
            done |= np.isin(nxt, plan.eos)
        if plan.stop_check is not None:
            done |= plan.stop_check(seqs[:, prompt_len : length + 1])
        yield nxt
        if done.all() or step == plan.max_new_tokens - 1:
            return  # the last token never needs a forward pass
        logits = runner.run(nxt[:, None])


# --- beam search ------------------------------------------------------------------------------------------


class _BeamHypotheses:
    """Finished hypotheses of one batch item, as HF's `BeamHypotheses`: the best `num_beams`, scored by
    sum of log-probs / generated_length ** length_penalty."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping, max_new_tokens: int):
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.max_new_tokens = max_new_tokens
        self.beams: list[tuple[float, np.ndarray]] = []
        self.worst_score = 1e9

    def add(self, hyp: np.ndarray, sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / (generated_len**self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        """Whether no running beam can still beat the worst kept hypothesis. early_stopping=True: as soon as
        num_beams are finished; False: HF's heuristic, judged at the current length; "never": judged at
        the most favourable length (max length when length_penalty > 0)."""
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        length = generated_len
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            length = self.max_new_tokens
        return self.worst_score >= best_sum_logprobs / length**self.length_penalty


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _select_beams(hyps, candidates, eos, num_beams, seqs, generated_len):
    """HF `BeamSearchScorer.process` for one batch item: walks the 2*num_beams best candidates
    (score, token, source row) in order; an eos candidate ranked within the top num_beams becomes a
    finished hypothesis, the others fill the num_beams running beams."""
    scores, tokens, sources = [], [], []
    for rank, (score, token, source) in enumerate(candidates):
        if token in eos:
            if rank < num_beams:
                hyps.add(seqs[source].copy(), float(score), generated_len)
        else:
            scores.append(score)
            tokens.append(token)
            sources.append(source)
        if len(scores) == num_beams:
            break
    return scores, tokens, sources


def beam_search(
    model,
    plan: _Plan,
    num_beams: int,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping=False,
    repetition_penalty=None,
) -> tuple[np.ndarray, np.ndarray]:
    """HF beam search (`_beam_search` with `BeamSearchScorer`). Returns the sequences
    [B * num_return_sequences, len] (prompt included, best first per batch item) and their
    `sequences_scores` (float32)."""
    batch, prompt_len = plan.ids.shape
    if plan.max_new_tokens == 0:
        # Nothing to generate (asked for none, or the prompt fills the context): each prompt
        # comes back as is, as greedy decoding returns it, with a score of 0.
        return np.repeat(plan.ids, num_return_sequences, axis=0), np.zeros(
            batch * num_return_sequences, dtype=np.float32
        )
    runner = _CachedRunner(model, plan.mask)
    logits = runner.run(plan.ids)
    # Prefill once, then copy each prompt's cache into its num_beams beams.
    expand = np.repeat(np.arange(batch), num_beams)
    runner.select(expand)
    logits, seqs = logits[expand], plan.ids[expand]
    beam_scores = np.zeros((batch, num_beams), dtype=np.float32)
    beam_scores[:, 1:] = -1e9  # only the first copy of each prompt may start a beam
    beam_scores = beam_scores.reshape(-1)
    hyps = [
        _BeamHypotheses(num_beams, length_penalty, early_stopping, plan.max_new_tokens) for _ in range(batch)
    ]
    done = np.zeros(batch, dtype=bool)
    n_candidates = max(2, 1 + len(plan.eos)) * num_beams
    for step in range(plan.max_new_tokens):
        scores = apply_repetition_penalty(_log_softmax(logits), seqs, repetition_penalty)
        scores = (scores + beam_scores[:, None]).reshape(batch, -1)
        vocab = logits.shape[-1]
        top = np.argsort(-scores, axis=-1, kind="stable")[:, :n_candidates]
        top_scores = np.take_along_axis(scores, top, axis=-1)
        generated_len = seqs.shape[1] + 1 - prompt_len
        next_scores = np.zeros((batch, num_beams), dtype=np.float32)
        next_tokens = np.full((batch, num_beams), plan.pad_id, dtype=np.int64)
        sources = np.arange(batch * num_beams).reshape(batch, num_beams)  # finished items keep their rows
        for b in np.flatnonzero(~done):
            candidates = zip(top_scores[b], top[b] % vocab, b * num_beams + top[b] // vocab, strict=True)
            picked = _select_beams(hyps[b], candidates, plan.eos, num_beams, seqs, generated_len)
            next_scores[b], next_tokens[b], sources[b] = picked
            done[b] = hyps[b].is_done(float(top_scores[b].max()), generated_len)
        sources = sources.reshape(-1)
        seqs = np.concatenate([seqs[sources], next_tokens.reshape(-1, 1)], axis=1)
        beam_scores = next_scores.reshape(-1)
        if done.all() or step == plan.max_new_tokens - 1:
            break
        runner.select(sources)
        logits = runner.run(next_tokens.reshape(-1, 1))
    return _finalize_beams(hyps, done, seqs, beam_scores, prompt_len, num_return_sequences, plan)


def _finalize_beams(hyps, done, seqs, beam_scores, prompt_len, num_return_sequences, plan):
    """HF `BeamSearchScorer.finalize`: open beams of unfinished items join the hypotheses; the best
    `num_return_sequences` per item are returned, shorter ones followed by eos and then pad."""
    num_beams = seqs.shape[0] // len(hyps)
    best, best_scores = [], []
    for b, item in enumerate(hyps):
        if not done[b]:
            for row in range(b * num_beams, (b + 1) * num_beams):
                item.add(seqs[row], float(beam_scores[row]), seqs.shape[1] - prompt_len)
        ranked = sorted(item.beams, key=lambda beam: beam[0])
        for _ in range(num_return_sequences):
            score, hyp = ranked.pop()
            best.append(hyp)
            best_scores.append(score)
    lengths = [len(h) for h in best]
    width = min(max(lengths) + 1, prompt_len + plan.max_new_tokens)
    out = np.full((len(best), width), plan.pad_id, dtype=np.int64)
    for i, hyp in enumerate(best):
        out[i, : len(hyp)] = hyp
        if len(hyp) < width:
            out[i, len(hyp)] = plan.eos[0] if plan.eos else plan.pad_id
    return out, np.asarray(best_scores, dtype=np.float32)


# --- public entry points ----------------------------------------------------------------------------------


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _check_beam_memory(model, prompt_shape, num_beams: int, max_new_tokens: int) -> None:
    """Beam search keeps num_beams rows of logits and of KV cache per prompt: refuse a count that
    cannot fit before allocating any of it."""
    batch, prompt_len = prompt_shape
    rows = batch * num_beams
    spec = model.config
    hidden = spec.get("hidden_size") or spec.get("d_model") or spec.get("n_embd") or 1
    per_row = 4 * (2 * model.vocab_size + 2 * model.num_layers * (prompt_len + max_new_tokens) * hidden)
    need = rows * per_row
    if need > physical_memory():
        raise ValueError(
            f"num_beams={num_beams} would need about {need / 2**30:.1f} GiB for logits and the KV cache, "
            f"more than this machine's {physical_memory() / 2**30:.1f} GiB"
        )


def _validate_search(num_beams, num_return_sequences, do_sample, early_stopping, stop_strings):
    if isinstance(num_beams, bool) or int(num_beams) != num_beams or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if int(num_return_sequences) != num_return_sequences or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f'early_stopping must be True, False or "never", got {early_stopping!r}')
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling (do_sample=True with num_beams > 1) is not supported")
    if num_beams > 1 and stop_strings:
        raise ValueError("stop_strings are not supported with beam search")
    if num_return_sequences > num_beams and not do_sample:
        raise ValueError(
            f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}) "
            "unless do_sample=True"
        )


def plan_generation(
    model,
    prompt_ids,
    max_new_tokens=16,
    do_sample=False,
    temperature=None,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=None,
    num_return_sequences=1,
    eos_token_id=None,
    stop_strings=None,
    tokenizer=None,
    seed=None,
    attention_mask=None,
    pad_token_id=None,
) -> _Plan:
    """Validates the options and prepares the prompt; shared by `generate` and the streaming functions."""
    validate_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    eos = resolve_eos(model, tokenizer, eos_token_id)
    pad_id = _resolve_pad(model, tokenizer, pad_token_id, eos)
    ids, mask = prepare_prompt(prompt_ids, attention_mask, pad_id)
    max_new_tokens = _cap_to_context(model, ids.shape[1], max_new_tokens)
    if do_sample:
        pick = _sampling_picker(
            seed,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        if num_return_sequences > 1:
            # Independent samples: each prompt row is repeated, as HF's expand for sampling.
            ids = np.repeat(ids, num_return_sequences, axis=0)
            mask = None if mask is None else np.repeat(mask, num_return_sequences, axis=0)
    else:
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        ignored = [name for name, value in given.items() if value is not None]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: do_sample=False decodes greedily", stacklevel=3)
        pick = _greedy_picker(repetition_penalty)
    return _Plan(ids, mask, max_new_tokens, eos, pad_id, pick, _stop_string_checker(tokenizer, stop_strings))


def generate(
    model,
    prompt_ids,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping=False,
    eos_token_id=None,
    stop_strings=None,
    seed: int | None = None,
    attention_mask=None,
    tokenizer=None,
    pad_token_id: int | None = None,
) -> np.ndarray:
    """Prompt + new ids as int64 [B * num_return_sequences, len], best beam first; option names and
    semantics as `transformers.generate`.

    * `prompt_ids`: [B, T] ids (with an optional left-padding `attention_mask`), or a list of id lists of
      different lengths, which are left-padded.
    * Greedy by default; `do_sample=True` draws from `next_token_probs(...)` with a numpy Generator
      seeded by `seed` (same seed, same tokens); `num_beams > 1` runs beam search.
    * Stops at `eos_token_id` (default: the model's, plus the tokenizer's; `[]` disables) and at
      `stop_strings` (needs `tokenizer`); finished rows are filled with the pad id (pad_token_id, the
      tokenizer's or config's pad, else the first eos id).
    """
    _validate_search(num_beams, num_return_sequences, do_sample, early_stopping, stop_strings)
    # Each option is named here and passed on by name rather than through **options, so that
    # this signature documents them all, as transformers' generate does.
    plan = plan_generation(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id,
        stop_strings=stop_strings,
        tokenizer=tokenizer,
        seed=seed,
        attention_mask=attention_mask,
        pad_token_id=pad_token_id,
    )
    if num_beams > 1:
        _check_beam_memory(model, plan.ids.shape, num_beams, max_new_tokens)
        sequences, _ = beam_search(
            model, plan, num_beams, num_return_sequences, length_penalty, early_stopping, repetition_penalty
        )
        return sequences
    columns = [c[:, None] for c in _token_columns(model, plan)]
    return np.concatenate([plan.ids, *columns], axis=1)


def generate_columns(model, prompt_ids, **options) -> Iterator[np.ndarray]:
    """Greedy or sampled generation as an iterator of new-token columns [B], one per step (for streaming).
    Takes `generate`'s options except beam search ones."""
    return _token_columns(model, plan_generation(model, prompt_ids, **options))


# --- text in, text out ------------------------------------------------------------------------------------


def _prompt_ids(tokenizer, prompt) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    if not ids:
        raise ValueError("the prompt is empty; give at least one token of text")
    return ids


def _stop_strings_list(stop_strings) -> list[str]:
    if not stop_strings:
        return []
    return [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)


def _text_end(text: str, stops: list[str], include_stop: bool, final: bool) -> tuple[int, bool]:
    """How much of `text` may be shown, and whether a stop string ended it. Unless `final`, a trailing
    U+FFFD (a multi-byte character whose bytes have not all arrived) is held back, and so is a tail that
    could still become an excluded stop string."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if hits:
        start, stop = min(hits)
        return (start + len(stop) if include_stop else start), True
    if final:
        return len(text), False
    end = len(text.rstrip("\ufffd"))
    if not include_stop:
        for stop in stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text[:end].endswith(stop[:k]):
                    end -= k
                    break
    return end, False


def stream_text(
    model,
    tokenizer,
    prompt,
    *,
    skip_special_tokens: bool = True,
    include_stop_strings: bool = True,
    **options,
) -> Iterator[str]:
    """Generates from `prompt` (text, or a list of ids) and yields the new text piece by piece as tokens
    arrive. A piece never ends inside a multi-byte UTF-8 character. Options are `generate`'s; eos defaults
    to the model's plus the tokenizer's. Generation and the text stop at the first stop string (kept
    in the text unless `include_stop_strings=False`). Beam search yields its best sequence in one piece."""
    ids = _prompt_ids(tokenizer, prompt)
    stops = _stop_strings_list(options.pop("stop_strings", None))
    num_beams = options.pop("num_beams", 1)
    if options.get("num_return_sequences", 1) != 1:
        raise ValueError("text generation returns one text: num_return_sequences must be 1")
    if num_beams != 1:
        out = generate(model, [ids], num_beams=num_beams, tokenizer=tokenizer, **options)
        text = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=skip_special_tokens)
        yield text[: _text_end(text, stops, include_stop_strings, final=True)[0]]
        return
    new_ids: list[int] = []
    shown = 0
    columns = generate_columns(model, [ids], tokenizer=tokenizer, stop_strings=stops or None, **options)
    for column in columns:
        new_ids.append(int(column[0]))
        text = tokenizer.decode(new_ids, skip_special_tokens=skip_special_tokens)
        end, stopped = _text_end(text, stops, include_stop_strings, final=False)
        if end > shown:
            yield text[shown:end]
            shown = end
        if stopped:
            return
    text = tokenizer.decode(new_ids, skip_special_tokens=skip_special_tokens)
    end, _ = _text_end(text, stops, include_stop_strings, final=True)
    if end > shown:
        yield text[shown:end]


def generate_text(model, *args, tokenizer=None, max_length: int | None = None, **options) -> str:
    """The new text generated from a prompt (without the prompt); options as `stream_text`.

    Called as `generate_text(model, tokenizer, prompt, max_new_tokens=..., ...)`, or in the form
    GPT-2 scripts use, `generate_text(model, prompt, tokenizer=tok, max_length=..., temperature=...,
    top_k=..., top_p=...)`: there `max_length` counts the prompt, as in transformers, and a
    temperature, top_k or top_p turns sampling on (temperature 0 is greedy)."""
    if tokenizer is None:
        if len(args) != 2:
            raise TypeError(
                "generate_text(model, tokenizer, prompt, ...) or generate_text(model, prompt, tokenizer=...)"
            )
        tokenizer, prompt = args
    else:
        if len(args) != 1:
            raise TypeError("generate_text(model, prompt, tokenizer=...) takes one prompt")
        (prompt,) = args
        sampling = [k for k in ("temperature", "top_k", "top_p") if options.get(k) is not None]
        if "do_sample" not in options and sampling:
            options["do_sample"] = options.get("temperature", 1.0) != 0
            if not options["do_sample"]:
                for k in sampling:
                    options.pop(k)
    if max_length is not None:
        if "max_new_tokens" in options:
            raise ValueError("pass max_length (prompt included) or max_new_tokens, not both")
        options["max_new_tokens"] = max(0, max_length - len(_prompt_ids(tokenizer, prompt)))
    return "".join(stream_text(model, tokenizer, prompt, **options))


def generation_options(gen: dict) -> dict:
    """[generate] as keyword arguments of `generate_text`. Temperature 0 means greedy, which takes
    no sampling options (generate warns about ignored ones), so they are only passed when sampling."""
    opts = {
        "max_new_tokens": gen["max_new_tokens"],
        "do_sample": gen["temperature"] > 0,
        "repetition_penalty": gen["repetition_penalty"] if gen["repetition_penalty"] != 1.0 else None,
        "num_beams": gen["num_beams"],
    }
    if opts["do_sample"]:
        opts.update(
            temperature=gen["temperature"],
            top_k=gen["top_k"] or None,
            top_p=gen["top_p"] if gen["top_p"] < 1.0 else None,
            seed=gen["seed"],
        )
    return opts

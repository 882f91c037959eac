"""Tokenizers you train on your own corpus, as objects: `BasicTokenizer` (word level) and
`BPETokenizer` (byte-level BPE, over `train_bpe`). Both save as a regular tokenizer.json, which
`load_tokenizer` and transformers read back."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

from metalcandle.tokenizers import Tokenizer, _training_texts, load_tokenizer, train_bpe

BASIC_SPECIALS = ("<unk>", "<pad>", "<|endoftext|>")


class BasicTokenizer(Tokenizer):
    """Word-level: a token per word and per punctuation mark, with a vocabulary built from a corpus
    (the `vocab_size` most frequent words, or every word seen `min_frequency` times). Words outside it
    encode to `<unk>`; decoding joins tokens with spaces, so it gives back the normalised text with
    spaces around punctuation.

    `lowercase` and `normalize_whitespace` (runs of white space become one space) are applied before
    splitting, when training and when encoding. `special_tokens` take the first ids, `<unk>` first;
    the last is eos, and `<pad>` pads when it is there."""

    def __init__(
        self,
        lowercase: bool = True,
        normalize_whitespace: bool = True,
        special_tokens: Sequence[str] = BASIC_SPECIALS,
        vocab_size: int | None = None,
        min_frequency: int = 1,
    ):
        specials = list(special_tokens)
        if not specials or specials[0] != "<unk>":
            raise ValueError(f'special_tokens must start with "<unk>", got {specials}')
        if vocab_size is not None and vocab_size <= len(specials):
            raise ValueError(f"vocab_size {vocab_size} leaves no room beside {len(specials)} special tokens")
        self.options = {
            "lowercase": lowercase,
            "normalize_whitespace": normalize_whitespace,
            "special_tokens": specials,
            "vocab_size": vocab_size,
            "min_frequency": min_frequency,
        }
        super().__init__(self._backend_with({t: i for i, t in enumerate(specials)}), self._config())

    def _backend_with(self, vocab: dict[str, int]) -> _Backend:
        backend = _Backend(models.WordLevel(vocab, unk_token="<unk>"))
        steps = [normalizers.NFKC()]
        if self.options["lowercase"]:
            steps.append(normalizers.Lowercase())
        if self.options["normalize_whitespace"]:
            steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
        backend.normalizer = normalizers.Sequence(steps)
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.add_special_tokens(self.options["special_tokens"])
        return backend

    def _config(self) -> dict:
        specials = self.options["special_tokens"]
        return {
            "unk_token": "<unk>",
            "eos_token": specials[-1] if len(specials) > 1 else None,
            "pad_token": "<pad>" if "<pad>" in specials else None,
            "bos_token": None,
            "basic_tokenizer": self.options,
        }

    def train(self, texts_or_files) -> BasicTokenizer:
        """Builds the vocabulary from texts (strings) or files (`pathlib.Path`s, read as UTF-8)."""
        o = self.options
        backend = self._backend_with({t: i for i, t in enumerate(o["special_tokens"])})
        trainer = trainers.WordLevelTrainer(
            vocab_size=o["vocab_size"] or 2**31 - 1,
            min_frequency=o["min_frequency"],
            special_tokens=o["special_tokens"],
            show_progress=False,
        )
        backend.train_from_iterator(_training_texts(texts_or_files), trainer=trainer)
        self._backend = backend
        return self

    @classmethod
    def load(cls, folder: str | os.PathLike) -> BasicTokenizer:
        loaded = load_tokenizer(folder)
        options = loaded.config.get("basic_tokenizer")
        if not isinstance(options, dict):
            raise ValueError(f"{Path(folder) / 'tokenizer_config.json'}: not a saved BasicTokenizer")
        tok = cls(**options)
        tok._backend, tok.config = loaded._backend, loaded.config
        return tok


class BPETokenizer(Tokenizer):
    """Byte-level BPE of `vocab_size` ids (special tokens included), trained with `train`: the GPT-2
    pre-tokenizer and all 256 bytes, so any text encodes without unknowns (see `train_bpe`)."""

    def __init__(self, vocab_size: int = 1024, special_tokens: Sequence[str] = ("<|endoftext|>",)):
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(
                f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte ids plus "
                f"{len(special_tokens)} special tokens"
            )
        self.vocab_size_target = vocab_size
        self.special_tokens = list(special_tokens)
        super().__init__(_Backend(models.BPE()), {})
        self._trained = False

    def train(self, texts_or_files, min_frequency: int = 2) -> BPETokenizer:
        trained = train_bpe(texts_or_files, self.vocab_size_target, self.special_tokens, min_frequency)
        self._backend, self.config, self._trained = trained._backend, trained.config, True
        return self

    def encode(self, text: str) -> list[int]:
        if not self._trained:
            raise ValueError(
                "BPETokenizer.encode before train(): train it on a corpus, or load() a saved one"
            )
        return super().encode(text)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> BPETokenizer:
        loaded = load_tokenizer(folder)
        tok = cls(max(loaded.vocab_size, 257))
        tok._backend, tok.config, tok._trained = loaded._backend, loaded.config, True
        return tok


__all__ = ["BasicTokenizer", "BPETokenizer"]

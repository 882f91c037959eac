"""Tokenizers: Hugging Face `tokenizer.json` folders, a character-level ASCII tokenizer, and byte-level BPE
training. All three share one `Tokenizer` interface and load back with `load_tokenizer`."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAR_FILE = "char_tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The special-token names transformers exposes to chat templates (`{{ eos_token }}` etc.).
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as plain strings or as serialised AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the parts of `tokenizer_config.json` generation needs: special tokens
    and the chat template."""

    def __init__(self, backend: _Backend, config: dict | None = None):
        self._backend = backend
        self.config: dict = dict(config or {})
        self._template = None

    # --- special tokens -------------------------------------------------------------------------------
    def _special_id(self, name: str) -> int | None:
        content = _token_content(self.config.get(name))
        return None if content is None else self._backend.token_to_id(content)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit, added tokens included (transformers' `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special)

    # --- text <-> ids ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids for `text`. Special tokens are only added if the tokenizer.json post-processor adds them
        (the fixtures' and Qwen's do not); special-token strings inside `text` map to their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for `ids`. Ids outside the tokenizer (a model's padded vocab rows) decode to nothing."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    # --- chat template --------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):
            # Multi-template configs: transformers uses the one named "default".
            if not all(isinstance(t, dict) and "name" in t and "template" in t for t in template):
                raise ValueError('chat_template: a list of templates must hold {"name", "template"} objects')
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise ValueError(f"chat_template must be a string, got {type(template).__name__}")
        return template

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **template_kwargs,
    ) -> str | list[int]:
        """Renders `messages` ([{"role", "content"}, ...]) the way transformers does (sandboxed jinja2 with
        trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, special tokens as
        variables). With `tokenize=True` returns ids, encoded without adding special tokens."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json has none)")
        if self._template is None:
            self._template = _compile_chat_template(self.chat_template)
        variables = {name: _token_content(self.config.get(name)) for name in _SPECIAL_NAMES}
        variables["additional_special_tokens"] = [
            _token_content(t) for t in self.config.get("additional_special_tokens", [])
        ]
        variables.update(template_kwargs)
        text = self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text) if tokenize else text

    # --- persistence ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json so `load_tokenizer(folder)` reads it back
        (and `transformers.AutoTokenizer` can load it too)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / TOKENIZER_FILE))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def _compile_chat_template(source: str):
    """The jinja2 environment transformers renders chat templates in (`_compile_jinja_template`)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # transformers marks assistant spans with {% generation %}; it only matters for its
        # assistant-mask feature, so here the block renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_render_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# --- character-level tokenizer --------------------------------------------------------------------------

CHAR_UNK = "<unk>"
CHAR_EOS = "<|endoftext|>"
_LONGEST_SPECIAL = max(len(CHAR_UNK), len(CHAR_EOS))
# Printable ASCII (space .. tilde), then newline and tab.
CHAR_ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t"


def _chunks(text: str, size: int, longest_special: int) -> Iterator[str]:
    """`text` in pieces of about `size` characters, never cut inside a special-token string: every
    special token starts with "<", so a cut just before a "<" (or with no "<" close before it) is safe."""
    size = max(size, 2 * longest_special)  # room for a whole special token after any cut
    start = 0
    while len(text) - start > size:
        cut = start + size
        lt = text.rfind("<", cut - longest_special + 1, cut)
        if lt > start:
            cut = lt
        yield text[start:cut]
        start = cut
    yield text[start:]


class CharTokenizer(Tokenizer):
    """Character-level ASCII tokenizer.

    Policy:
      * id 0 is `<unk>`, id 1 is `<|endoftext|>` (eos and pad), then one id per character of
        `CHAR_ALPHABET`: the 95 printable ASCII characters (space to `~`), newline and tab, in that order.
        The vocabulary therefore has 99 ids.
      * Every other character (accented letters, CJK, emoji, carriage returns, other control characters)
        encodes to the `<unk>` id, one id per character. Nothing is normalised away silently: each such
        character is counted in `unknown_counts` (a Counter, cumulative over `encode` calls; reset it with
        `reset_unknown_counts()`), and `unknown_summary()` gives a one-line report suitable for a warning.
      * The special-token strings `<unk>` and `<|endoftext|>` written in the text map to their ids.
      * Decoding joins characters without separators; `<unk>` decodes to the literal text `<unk>`
        unless `skip_special_tokens=True`.

    It is stored as a regular tokenizer.json (a WordLevel model on single characters, which transformers
    also loads) plus `char_tokenizer.json`, which records the policy so `load_tokenizer` returns a
    `CharTokenizer` again."""

    def __init__(self, backend: _Backend | None = None, config: dict | None = None):
        super().__init__(backend or _char_backend(), config or _char_config())
        self.unknown_counts: Counter[str] = Counter()
        self._unknown = re.compile("[^" + re.escape(CHAR_ALPHABET) + "]")

    # Encoding holds a few hundred bytes per character in the tokenizers library (offsets, token
    # strings), so long texts go through it in pieces of this many characters.
    ENCODE_CHUNK = 1 << 20

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _chunks(text, self.ENCODE_CHUNK, _LONGEST_SPECIAL):
            ids += super().encode(piece)
            self.unknown_counts.update(self._unknown_chars(piece))
        return ids

    def _unknown_chars(self, text: str) -> list[str]:
        # Special-token strings are made of alphabet characters, so they never count as unknown.
        return self._unknown.findall(text)

    def count_unknown(self, text: str) -> Counter[str]:
        """The characters of `text` that would map to `<unk>`, with counts (does not update the totals)."""
        return Counter(self._unknown_chars(text))

    def reset_unknown_counts(self) -> None:
        self.unknown_counts.clear()

    def unknown_summary(self, limit: int = 10) -> str:
        """One line: how many characters were mapped to <unk> so far, most frequent first."""
        total = sum(self.unknown_counts.values())
        if total == 0:
            return "no characters outside the ASCII alphabet"
        shown = ", ".join(f"{c!r} x{n}" for c, n in self.unknown_counts.most_common(limit))
        more = len(self.unknown_counts) - limit
        tail = f", and {more} more distinct" if more > 0 else ""
        return f"{total} characters outside the ASCII alphabet were encoded as {CHAR_UNK}: {shown}{tail}"

    def save(self, folder: str | os.PathLike) -> None:
        super().save(folder)
        policy = {"type": "char", "version": 1, "alphabet": CHAR_ALPHABET, "unk_token": CHAR_UNK}
        (Path(folder) / CHAR_FILE).write_text(json.dumps(policy, indent=2) + "\n")


def _char_backend() -> _Backend:
    vocab = {CHAR_UNK: 0, CHAR_EOS: 1}
    for offset, char in enumerate(CHAR_ALPHABET):
        vocab[char] = offset + 2
    backend = _Backend(models.WordLevel(vocab, unk_token=CHAR_UNK))
    # One pre-token per character; [\s\S] rather than "." so that newlines are characters too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([CHAR_UNK, CHAR_EOS])
    return backend


def _char_config() -> dict:
    return {"eos_token": CHAR_EOS, "pad_token": CHAR_EOS, "unk_token": CHAR_UNK, "bos_token": None}


# --- BPE training -----------------------------------------------------------------------------------------


def _training_texts(texts_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> Iterator[str]:
    """`pathlib.Path`s (or one path given on its own) are files, read as UTF-8 and fed paragraph by
    paragraph (split on blank lines); plain strings in a list are training texts themselves."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [Path(texts_or_files)]
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            content = Path(item).read_text(encoding="utf-8")
            yield from (p for p in content.split("\n\n") if p)
        else:
            yield item


def train_bpe(
    texts_or_files,
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    min_frequency: int = 2,
) -> Tokenizer:
    """Trains a byte-level BPE tokenizer (GPT-2 pre-tokenizer regex, all 256 byte symbols in the initial
    alphabet, ByteLevel decoder, no post-processor). Special tokens are added after training so they take
    the last ids, as in Qwen; `vocab_size` counts them. The first special token is eos and pad.
    Training is deterministic: the same inputs give the same vocabulary and merges."""
    special_tokens = list(special_tokens)
    base_size = vocab_size - len(special_tokens)
    if base_size < 256:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte ids plus "
            f"{len(special_tokens)} special tokens"
        )
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_texts(texts_or_files), trainer=trainer)
    backend.add_special_tokens(special_tokens)
    first = special_tokens[0] if special_tokens else None
    return Tokenizer(backend, {"eos_token": first, "pad_token": first, "bos_token": None})


# --- loading ----------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer in a model or checkpoint folder: tokenizer.json + tokenizer_config.json (with its chat
    template, or a separate chat_template.jinja), or a char tokenizer metalcandle saved. A GGUF file
    (or a folder holding only model.gguf) gives the tokenizer.json embedded in it."""
    from metalcandle.model import GGUF_FILE, is_gguf

    folder = Path(folder)
    if folder.is_file() and is_gguf(folder):
        return _gguf_tokenizer(folder)
    if not (folder / TOKENIZER_FILE).is_file() and (folder / GGUF_FILE).is_file():
        return _gguf_tokenizer(folder / GGUF_FILE)
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {folder}")
    try:
        backend = _Backend.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception without the file
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from None
    config_path = folder / CONFIG_FILE
    config = _read_json_object(config_path) if config_path.is_file() else {}
    template_path = folder / CHAT_TEMPLATE_FILE
    if "chat_template" not in config and template_path.is_file():
        config["chat_template"] = template_path.read_text(encoding="utf-8")
    tokenizer = (
        CharTokenizer(backend, config) if (folder / CHAR_FILE).is_file() else Tokenizer(backend, config)
    )
    try:
        tokenizer.chat_template  # noqa: B018 (checked here, where the file can be named)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    return tokenizer


def _gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer.json a GGUF file embeds. GGUF keeps special tokens as ids (llama.cpp's
    `tokenizer.ggml.*_token_id`) and the template as `tokenizer.chat_template`, so the
    tokenizer_config fields come back from those keys where the file has them."""
    from metalcandle import _core

    text = _core.gguf_tokenizer_json(str(path))
    if text is None:
        raise FileNotFoundError(f"{path}: the GGUF file embeds no tokenizer (tokenizer.huggingface.json)")
    backend = _Backend.from_str(text)
    metadata = _core.gguf_metadata(str(path))
    config: dict = {}
    keys = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    for name, key in keys.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int):
            config[name] = backend.id_to_token(token_id)
    if isinstance(metadata.get("tokenizer.chat_template"), str):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return Tokenizer(backend, config)

"""Fuzz targets for every reader of outside data, one function per target taking the raw bytes.

The contract each input is held to: it loads, or it raises one of `DOCUMENTED` whose message names
the file (or, for `--set` overrides, the key) at fault. Anything else propagates and is a crash:
a Rust panic (pyo3's PanicException derives from BaseException, so it is never caught here), a
TypeError/KeyError/AttributeError from code that trusted its input, or a message that names no file.
Hangs and header-driven allocations are caught by the fuzzer's -timeout and -rss_limit_mb.

Multi-file inputs are split on SEP (e.g. adapter_config.json SEP adapter_model.safetensors).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import metalcandle as mc
from metalcandle import data as D
from metalcandle.checkpoint import STATE_FILE, read_json
from metalcandle.config import load_config
from metalcandle.errors import UserError
from metalcandle.registry import Registry
from metalcandle.tokenizers import CharTokenizer, load_tokenizer

DOCUMENTED = (ValueError, OSError, UserError)
SEP = b"\n--8<--\n"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
QWEN = FIXTURES / "tiny-qwen2"


class ContractError(AssertionError):
    """A documented exception whose message does not name the file or key at fault."""


def _work() -> Path:
    d = Path(tempfile.gettempdir()) / f"mc-fuzz-{os.getpid()}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    return d


def _expect(fn, *names: str) -> None:
    try:
        fn()
    except DOCUMENTED as e:
        msg = str(e)
        if names and not any(n in msg for n in names):
            raise ContractError(f"{type(e).__name__} names none of {names}: {msg[:300]}") from e


def split_safetensors(blob: bytes) -> tuple[bytes, bytes]:
    n = struct.unpack("<Q", blob[:8])[0]
    return blob[8 : 8 + n], blob[8 + n :]


_QWEN_HEADER, _QWEN_DATA = split_safetensors((QWEN / "model.safetensors").read_bytes())


def _safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


# --- targets -------------------------------------------------------------------------------------


def safetensors_header(data: bytes) -> None:
    """The JSON header of model.safetensors (the fixture's tensor bytes after it)."""
    d = _work()
    shutil.copy(QWEN / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes(_safetensors(data, _QWEN_DATA))
    _expect(lambda: mc.load_model(d), "model.safetensors", str(d))


def safetensors_index(data: bytes) -> None:
    """model.safetensors.index.json beside one shard (the fixture's weights)."""
    d = _work()
    shutil.copy(QWEN / "config.json", d / "config.json")
    shutil.copy(QWEN / "model.safetensors", d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_bytes(data)
    _expect(lambda: mc.load_model(d), "index.json", str(d))


def config_json(data: bytes) -> None:
    """config.json beside the fixture's weights."""
    d = _work()
    (d / "config.json").write_bytes(data)
    shutil.copy(QWEN / "model.safetensors", d / "model.safetensors")
    _expect(lambda: mc.load_model(d), "config.json", str(d))


def from_config(data: bytes) -> None:
    """Model.from_config on a JSON document (sizes must be refused before allocating)."""
    try:
        cfg = json.loads(data)
    except (ValueError, RecursionError):
        return
    if not isinstance(cfg, dict):
        return
    _expect(lambda: mc.Model.from_config(cfg), "config")


_GGUF: bytes | None = None


def gguf_seed() -> bytes:
    """A small GGUF file written by this package from the fixture (q8_0)."""
    global _GGUF
    if _GGUF is None:
        from metalcandle.quantize import quantize_model

        d = Path(tempfile.mkdtemp(prefix="mc-fuzz-gguf-"))
        model = mc.load_model(FIXTURES / "tiny-llama")
        quantize_model(model, "q8_0")
        model.save_gguf(d / "model.gguf", load_tokenizer(FIXTURES / "tiny-llama"))
        _GGUF = (d / "model.gguf").read_bytes()
        shutil.rmtree(d)
    return _GGUF


def gguf_file(data: bytes) -> None:
    """A whole GGUF file."""
    d = _work()
    (d / "model.gguf").write_bytes(data)
    _expect(lambda: mc.load_model(d / "model.gguf"), "model.gguf")


def tokenizer_files(data: bytes) -> None:
    """tokenizer.json SEP tokenizer_config.json, loaded, then used to encode and render a chat."""
    d = _work()
    tok, _, cfg = data.partition(SEP)
    (d / "tokenizer.json").write_bytes(tok)
    if cfg:
        (d / "tokenizer_config.json").write_bytes(cfg)

    def run():
        t = load_tokenizer(d)
        t.encode("Hello, world <|endoftext|>")
        if t.chat_template is not None:
            try:
                t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
            except Exception as e:  # a template's own raise_exception/undefined names: not a reader bug
                if type(e).__module__.startswith("jinja2"):
                    return
                raise

    _expect(run, "tokenizer", str(d))


_BASE = None


def adapter_folder(data: bytes) -> None:
    """adapter_config.json SEP adapter_model.safetensors, loaded onto the fixture's base model."""
    global _BASE
    if _BASE is None:
        _BASE = mc.load_model(QWEN)
    d = _work()
    cfg, _, weights = data.partition(SEP)
    (d / "adapter_config.json").write_bytes(cfg)
    (d / "adapter_model.safetensors").write_bytes(weights)
    if _BASE.has_adapter:
        _BASE.remove_adapter()
    _expect(lambda: _BASE.load_adapter(d), "adapter_")
    if _BASE.has_adapter:
        _BASE.remove_adapter()


def toml_config(data: bytes) -> None:
    """A run config: TOML, then one `--set` override per line after SEP."""
    d = _work()
    text, _, sets = data.partition(SEP)
    (d / "run.toml").write_bytes(text)
    try:
        overrides = sets.decode("utf-8").split("\n") if sets else []
    except UnicodeDecodeError:
        return
    _expect(lambda: load_config(d / "run.toml", [o for o in overrides if o]), "run.toml", "--set")


_CHAT_TOK = None


def jsonl_data(data: bytes) -> None:
    """A data file (.jsonl, or .txt when the first byte is odd) in the format the second byte picks,
    read with the char tokenizer and with a chat-template tokenizer."""
    global _CHAT_TOK
    if _CHAT_TOK is None:
        _CHAT_TOK = load_tokenizer(QWEN)
    if len(data) < 2:
        return
    d = _work()
    path = d / ("data.txt" if data[0] & 1 else "data.jsonl")
    path.write_bytes(data[2:])
    fmt = ("auto", *D.FORMATS)[data[1] % (1 + len(D.FORMATS))]
    for tok in (CharTokenizer(), _CHAT_TOK):
        _expect(lambda tok=tok: D.read_examples([path], fmt, tok, mask_prompt=True), "data.")


def checkpoint_state(data: bytes) -> None:
    """A checkpoint's state.json SEP metadata.json SEP registry.json, read the way resume, an adapter
    checkpoint's base lookup and the registry read them."""
    from metalcandle.loading import adapter_base_path
    from metalcandle.train import RunState

    d = _work()
    state, _, rest = data.partition(SEP)
    meta, _, registry = rest.partition(SEP)
    (d / STATE_FILE).write_bytes(state)
    (d / "metadata.json").write_bytes(meta)
    (d / "adapter_config.json").write_text('{"base_model_name_or_path": null}')
    (d / "models").mkdir()
    (d / "models" / "registry.json").write_bytes(registry)
    _expect(lambda: RunState.from_saved(read_json(d / STATE_FILE), d / STATE_FILE), STATE_FILE)
    _expect(lambda: adapter_base_path(d), "metadata.json", str(d))
    _expect(lambda: Registry(d / "models").entries(), "registry.json")


TARGETS = {
    f.__name__: f
    for f in (
        safetensors_header,
        safetensors_index,
        config_json,
        from_config,
        gguf_file,
        tokenizer_files,
        adapter_folder,
        toml_config,
        jsonl_data,
        checkpoint_state,
    )
}


# --- seeds from the repository's fixtures --------------------------------------------------------


def seeds(target: str) -> list[bytes]:
    if target == "safetensors_header":
        return [
            _QWEN_HEADER,
            split_safetensors((FIXTURES / "tiny-gpt2" / "model.safetensors").read_bytes())[0],
        ]
    if target == "safetensors_index":
        names = json.loads(_QWEN_HEADER)
        return [
            json.dumps(
                {
                    "metadata": {},
                    "weight_map": {
                        k: "model-00001-of-00001.safetensors" for k in names if k != "__metadata__"
                    },
                }
            ).encode()
        ]
    if target in ("config_json", "from_config"):
        return [
            (FIXTURES / m / "config.json").read_bytes()
            for m in ("tiny-qwen2", "tiny-gpt2", "tiny-llama", "tiny-mistral-sw")
        ]
    if target == "gguf_file":
        return [gguf_seed()]
    if target == "tokenizer_files":
        return [
            (FIXTURES / f / "tokenizer.json").read_bytes()
            + SEP
            + (FIXTURES / f / "tokenizer_config.json").read_bytes()
            for f in ("tokenizer", "tiny-qwen2")
        ]
    if target == "adapter_folder":
        out = []
        for a in sorted((QWEN / "lora").iterdir()):
            if a.is_dir():
                out.append(
                    (a / "adapter_config.json").read_bytes()
                    + SEP
                    + (a / "adapter_model.safetensors").read_bytes()
                )
        return out
    if target == "toml_config":
        from metalcandle.templates import FROM_SCRATCH, LORA

        return [
            FROM_SCRATCH.encode() + SEP + b"train.max_steps=5\nrun.name=x",
            LORA.encode() + SEP + b"lora.r=4",
        ]
    if target == "jsonl_data":
        return [
            b"\x00\x00" + b'{"text": "hello world"}\n{"text": "more"}\n',
            b"\x00\x02" + b'{"prompt": "2+2=", "completion": "4"}\n',
            b"\x00\x03"
            + b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
            b"\x01\x01" + (FIXTURES / "corpus.txt").read_bytes()[:2000],
        ]
    if target == "checkpoint_state":
        state = {
            "step": 10,
            "data_position": 80,
            "tokens_seen": 1000,
            "best_val_loss": 2.5,
            "best_step": 10,
            "evals_since_best": 0,
            "model_id": "mc-0123456789ab",
            "stopped_early": False,
            "run_id": "r",
            "run_created_at": "2026-01-01T00:00:00+00:00",
        }
        meta = {"base_model_path": str(QWEN), "run_id": "r"}
        reg = {"models": {"m": {"model_name": "m", "path": "MODELS/m"}}}
        return [json.dumps(state).encode() + SEP + json.dumps(meta).encode() + SEP + json.dumps(reg).encode()]
    raise KeyError(target)

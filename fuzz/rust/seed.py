"""Writes the seed corpus of every Rust fuzz target from the repository's fixtures (tests/fixtures):

    python fuzz/rust/seed.py [OUT_DIR]

into OUT_DIR/TARGET/ (default fuzz/rust/corpus, not committed). The fixtures hold no GGUF file
and no optimizer state, so those seeds are written here, small, in the formats' own layouts.
Standard library only: it runs before anything is built.

Multi-file inputs are joined with SEP, as the targets split them (fuzz/rust/src/lib.rs).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent.parent / "tests" / "fixtures"
QWEN = FIXTURES / "tiny-qwen2"
SEP = b"\n--8<--\n"


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    """name -> (dtype, shape, raw bytes), laid out in name order as the reference writer does."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    # The reference writer pads the header with spaces to a multiple of 8.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(values) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}f", *values)


def f16(values) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}e", *values)


def q8_0(values) -> bytes:
    """ggml's Q8_0: blocks of 32, an f16 scale then 32 int8."""
    values = list(values)
    out = b""
    for i in range(0, len(values), 32):
        block = values[i : i + 32]
        d = max(abs(v) for v in block) / 127 or 1.0
        out += struct.pack("<e32b", d, *(round(v / d) for v in block))
    return out


def wave(n: int, k: int = 1) -> list[float]:
    """Deterministic small weights, varied enough that no block is all zeros."""
    return [((i * 37 + k * 11) % 23 - 11) / 50 for i in range(n)]


# GGUF value types.
U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
# ggml tensor types.
T_F32, T_F16, T_Q8_0 = 0, 1, 8


def _value(ty: int, v) -> bytes:
    if ty == U32:
        return struct.pack("<I", v)
    if ty == I32:
        return struct.pack("<i", v)
    if ty == F32:
        return struct.pack("<f", v)
    if ty == BOOL:
        return struct.pack("<B", v)
    if ty == U64:
        return struct.pack("<Q", v)
    if ty == STRING:
        b = v.encode()
        return struct.pack("<Q", len(b)) + b
    if ty == ARRAY:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(_value(elem, x) for x in items)
    raise ValueError(ty)


def gguf(
    metadata: list[tuple[str, int, object]],
    tensors: list[tuple[str, list[int], int, bytes]],
    version: int = 3,
) -> bytes:
    """metadata: (key, type, value); tensors: (name, shape as [rows, cols], ggml type, bytes),
    each tensor padded to the alignment, as llama.cpp writes them."""
    align = next((v for k, _, v in metadata if k == "general.alignment"), 32)
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, ty, v in metadata:
        out += _value(STRING, key) + struct.pack("<I", ty) + _value(ty, v)
    offset = 0
    for name, shape, ty, raw in tensors:
        out += _value(STRING, name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", ty, offset)
        offset += len(raw) + (-len(raw) % align)
    out += b"\0" * (-len(out) % align)
    for _, _, _, raw in tensors:
        out += raw + b"\0" * (-len(raw) % align)
    return out


def _tiny_tensors(h: int, kv: int, ff: int, vocab: int, tied: bool, bias: bool) -> list:
    t = [
        ("token_embd.weight", [vocab, h], T_F32, f32(wave(vocab * h))),
        ("blk.0.attn_norm.weight", [h], T_F32, f32([1.0] * h)),
        ("blk.0.attn_q.weight", [h, h], T_Q8_0, q8_0(wave(h * h, 2))),
        ("blk.0.attn_k.weight", [kv, h], T_Q8_0, q8_0(wave(kv * h, 3))),
        ("blk.0.attn_v.weight", [kv, h], T_F16, f16(wave(kv * h, 4))),
        ("blk.0.attn_output.weight", [h, h], T_Q8_0, q8_0(wave(h * h, 5))),
        ("blk.0.ffn_norm.weight", [h], T_F32, f32([1.0] * h)),
        ("blk.0.ffn_gate.weight", [ff, h], T_Q8_0, q8_0(wave(ff * h, 6))),
        ("blk.0.ffn_up.weight", [ff, h], T_F16, f16(wave(ff * h, 7))),
        ("blk.0.ffn_down.weight", [h, ff], T_Q8_0, q8_0(wave(h * ff, 8))),
        ("output_norm.weight", [h], T_F32, f32([1.0] * h)),
    ]
    if bias:
        t += [
            ("blk.0.attn_q.bias", [h], T_F32, f32(wave(h, 9))),
            ("blk.0.attn_k.bias", [kv], T_F32, f32(wave(kv, 10))),
            ("blk.0.attn_v.bias", [kv], T_F32, f32(wave(kv, 11))),
        ]
    if not tied:
        t.append(("output.weight", [vocab, h], T_F32, f32(wave(vocab * h, 12))))
    return t


def gguf_seeds() -> dict[str, bytes]:
    h, heads, kv_heads, ff, vocab = 32, 4, 2, 64, 32
    kv = kv_heads * h // heads
    # As another tool writes a llama model: llama.cpp's keys only, a token list, untied head.
    llama = [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "tiny"),
        ("llama.context_length", U32, 64),
        ("llama.embedding_length", U32, h),
        ("llama.block_count", U32, 1),
        ("llama.feed_forward_length", U32, ff),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, kv_heads),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-6),
        ("llama.rope.freq_base", F32, 10000.0),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, [f"t{i}" for i in range(vocab)])),
        ("tokenizer.ggml.token_type", ARRAY, (I32, [1] * vocab)),
        ("tokenizer.ggml.merges", ARRAY, (STRING, ["t 1"])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
    ]
    # As this package writes a qwen2 model: the Hugging Face config kept whole, tied head,
    # the tokenizer's JSON, and a non-default alignment.
    config = {
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": h,
        "intermediate_size": ff,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    }
    qwen = [
        ("general.architecture", STRING, "qwen2"),
        ("general.alignment", U32, 64),
        ("general.file_type", U32, 7),
        ("metalcandle.config_json", STRING, json.dumps(config)),
        (
            "tokenizer.huggingface.json",
            STRING,
            json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}),
        ),
        ("tokenizer.chat_template", STRING, "{{ messages }}"),
        ("tokenizer.ggml.padding_token_id", U32, 0),
    ]
    return {
        "llama-keys": gguf(llama, _tiny_tensors(h, kv, ff, vocab, tied=False, bias=False)),
        "qwen2-config": gguf(qwen, _tiny_tensors(h, kv, ff, vocab, tied=True, bias=True), version=2),
    }


def _fixture_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def index_seeds() -> dict[str, bytes]:
    # The split the target's shards use: the fixture's tensors in name order, first half first.
    names = sorted(k for k in _fixture_header(QWEN / "model.safetensors") if k != "__metadata__")
    half = len(names) // 2
    shard = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {n: shard[i >= half] for i, n in enumerate(names)}
    return {
        "two-shards": json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2).encode()
    }


def safetensors_seeds() -> dict[str, bytes]:
    # Whole files, the small ones: in a large one nearly every mutation lands in tensor data,
    # which no check reads (safetensors_header mutates the fixtures' headers instead).
    out = {
        p.relative_to(FIXTURES).as_posix().replace("/", "-"): p.read_bytes()
        for p in sorted(FIXTURES.rglob("*.safetensors"))
        if p.stat().st_size < 200_000
    }
    out["every-dtype"] = safetensors(
        {
            "a": ("F32", [2, 3], f32(wave(6))),
            "b": ("F16", [4], f16(wave(4))),
            "c": ("BF16", [2], b"\x80\x3f\x00\x40"),
            "d": ("I64", [1], struct.pack("<q", -7)),
            "e": ("U8", [3], b"\x01\x02\x03"),
            "f": ("U32", [2], struct.pack("<2I", 5, 9)),
            "g": ("F64", [1], struct.pack("<d", 0.5)),
            "empty": ("F32", [0, 4], b""),
            "scalar": ("F32", [], f32([3.0])),
        },
        metadata={"format": "pt"},
    )
    return out


def header_seeds() -> dict[str, bytes]:
    # The target writes them over tiny-qwen2's tensor bytes: only its own header fits them.
    return {
        m: json.dumps(_fixture_header(FIXTURES / m / "model.safetensors")).encode()
        for m in ("tiny-qwen2", "tiny-gpt2", "tiny-qwen2-max-window")
    }


def config_seeds() -> dict[str, bytes]:
    out = {p.parent.name: p.read_bytes() for p in sorted(FIXTURES.glob("*/config.json"))}
    custom = {
        "model_type": "custom-transformer",
        "vocab_size": 50,
        "d_model": 32,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": 64,
        "max_seq_len": 64,
        "positions": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "layer_overrides": [
            {"layers": "0::2", "sliding_window": 8},
            {"layers": [1], "n_heads": 8, "n_kv_heads": 2},
        ],
    }
    out["custom-transformer"] = json.dumps(custom).encode()
    llama3 = json.loads((FIXTURES / "tiny-llama" / "config.json").read_text())
    llama3["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    out["llama3-rope"] = json.dumps(llama3).encode()
    return out


def adapter_seeds() -> dict[str, bytes]:
    return {
        a.name: (a / "adapter_config.json").read_bytes()
        + SEP
        + (a / "adapter_model.safetensors").read_bytes()
        for a in sorted((QWEN / "lora").iterdir())
        if a.is_dir()
    }


def optimizer_seeds() -> dict[str, bytes]:
    # The parameters the target steps: `w` [4] and `b` [2].
    shapes = {"w": 4, "b": 2}
    out = {}
    for algo, moments in (
        ({"name": "adamw"}, ("exp_avg", "exp_avg_sq")),
        ({"name": "sgd", "momentum": 0.9, "nesterov": True}, ("exp_avg",)),
        ({"name": "lion"}, ("exp_avg",)),
    ):
        config = {
            "algorithm": algo,
            "lr": 1e-3,
            "beta1": 0.9,
            "beta2": 0.999,
            "eps": 1e-8,
            "weight_decay": 0.01,
            "no_decay": ["b"],
        }
        meta = json.dumps({"config": config, "steps": {n: 3 for n in shapes}}, indent=2).encode()
        tensors = {
            f"{n}.{m}": ("F32", [k], f32(wave(k, i)))
            for i, m in enumerate(moments)
            for n, k in shapes.items()
        }
        out[algo["name"]] = meta + SEP + safetensors(tensors)
    return out


SEEDS = {
    "safetensors_file": safetensors_seeds,
    "safetensors_header": header_seeds,
    "safetensors_index": index_seeds,
    "config_json": config_seeds,
    "from_config": config_seeds,
    "gguf_file": gguf_seeds,
    "adapter_folder": adapter_seeds,
    "optimizer_state": optimizer_seeds,
}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "corpus"
    for target, make in SEEDS.items():
        d = out / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in make().items():
            (d / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    main()

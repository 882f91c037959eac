"""Post-training quantization: accuracy against float32 on the fixture checkpoints, bookkeeping,
dequantization, GGUF round trips, calibration plans, LoRA on a quantized base, and the CLI."""

import json
import shutil

import numpy as np
import pytest

import metalcandle as mc
from conftest import MODELS, PRETRAINED_TOML, run_cli, write_config
from metalcandle import _core
from metalcandle.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:kept in float32")

# 8 x 32 = 256 positions: enough that the top-1 agreement below is not decided by a handful of tokens.
IDS = np.random.default_rng(0).integers(0, 384, size=(8, 32))

# Bounds for logits vs float32 on the fixtures (|logits| <= ~2.7), with the measured worst case over
# the four models in brackets:
#   q8_0: max|d| 0.2 [0.097], mean|d| 0.025 [0.0124], ||d||/||logits|| 0.05 [0.025], top-1 >= 0.9 [0.945]
#   q4_0: mean|d| 0.3 [0.148], ||d||/||logits|| 0.5 [0.294], top-1 >= 0.5 [0.602]
# About 2x the measured worst case. The kernel rounds the activations to 8 bits as well as the weights,
# so q8_0 is ~1% error per matrix, over ~9 matrices in sequence. Top-1 agreement is low for a
# well-quantized model because these random-weight models have nearly flat next-token distributions:
# the median top-1/top-2 logit margin is only 0.14-0.16, so a shift of a few hundredths flips ~5% of
# the argmaxes. Trained models have far larger margins.
BOUNDS = {
    "q8_0": {"max": 0.2, "mean": 0.025, "rel": 0.05, "top1": 0.9},
    "q4_0": {"max": 3.0, "mean": 0.3, "rel": 0.5, "top1": 0.5},
}


def quantized(fixtures, name, fmt="q8_0"):
    return mc.quantize_model(mc.load_model(fixtures / name), fmt)


def deviation(ref, got):
    d = np.abs(got - ref)
    return {
        "max": float(d.max()),
        "mean": float(d.mean()),
        "rel": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


@pytest.mark.parametrize("name", MODELS)
def test_quantized_logits_stay_close_to_float(fixtures, name):
    model = mc.load_model(fixtures / name)
    ref = model.forward(IDS)
    seen = {}
    for fmt, bound in BOUNDS.items():
        q = quantized(fixtures, name, fmt)
        assert q.is_quantized and mc.is_model_quantized(q)
        seen[fmt] = dev = deviation(ref, q.forward(IDS))
        print(f"{name} {fmt}: " + "  ".join(f"{k} {v:.4f}" for k, v in dev.items()))
        assert dev["max"] <= bound["max"] and dev["mean"] <= bound["mean"] and dev["rel"] <= bound["rel"]
        assert dev["top1"] >= bound["top1"]
        assert dev["max"] > 0  # the matrices really were replaced
    # The 4-bit grid is 16x coarser than the 8-bit one.
    assert seen["q4_0"]["rel"] > 4 * seen["q8_0"]["rel"]
    assert not mc.is_model_quantized(model)


@pytest.mark.parametrize("fmt, bits", [("q8_0", 8.5), ("q4_0", 4.5)])
def test_quantization_info(fixtures, fmt, bits):
    model = quantized(fixtures, "tiny-qwen2", fmt)
    info = model.quantization_info()
    # Tied: the embedding is the LM head, so there is no separate lm_head matrix.
    assert len(info["layers"]) == 1 + 2 * 7 and info["float_layers"] == []
    assert info["quantized"] and info["format"] == fmt and info["bits_per_weight"] == bits
    assert model.last_quantization_report["kept_float"] == {}
    expected = {
        "model.embed_tokens": [400, 64],
        "model.layers.0.self_attn.q_proj": [64, 64],
        "model.layers.0.self_attn.k_proj": [32, 64],
        "model.layers.1.mlp.up_proj": [160, 64],
        "model.layers.1.mlp.down_proj": [64, 160],
    }
    for module, shape in expected.items():
        layer = info["layers"][module]
        assert layer["format"] == fmt and layer["bits_per_weight"] == bits and layer["shape"] == shape
        assert layer["bytes"] == shape[0] * shape[1] * bits / 8
    assert info["quantized_bytes"] == sum(layer["bytes"] for layer in info["layers"].values())
    assert info["float_bytes"] == 0

    untied = quantized(fixtures, "tiny-mistral-sw", fmt).quantization_info()
    assert untied["layers"]["lm_head"]["shape"] == [400, 64]

    fresh = mc.load_model(fixtures / "tiny-qwen2").quantization_info()
    assert not fresh["quantized"] and fresh["layers"] == {} and fresh["format"] is None
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160  # q, o; k, v (2 kv heads); gate, up, down
    assert fresh["float_bytes"] == 4 * (400 * 64 + 2 * per_layer)


def test_unsupported_inner_dims_stay_float_and_are_reported():
    # d_ff = 40: down_proj's input size is not a multiple of the 32-weight blocks.
    config = dict(model_type="custom-transformer", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=40, max_seq_len=32, norm="rmsnorm", mlp="swiglu", positions="rope",
                  tie_embeddings=False, dropout=0.0)  # fmt: skip
    model = mc.Model.from_config(config, seed=0)
    ids = np.arange(20).reshape(2, 10)
    ref = model.forward(ids)
    with pytest.warns(UserWarning, match=r"model.layers.0.mlp.down_proj: input size 40 is not a multiple"):
        assert mc.quantize_model(model, "q8_0") is model
    report = model.last_quantization_report
    down = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert sorted(report["kept_float"]) == down
    assert "block size 32" in report["kept_float"][down[0]]
    assert len(report["quantized"]) == 2 + 2 * 6  # embedding, lm_head, 6 linears per layer
    info = model.quantization_info()
    assert info["float_layers"] == down and info["float_bytes"] == 2 * 4 * 32 * 40
    assert np.abs(model.forward(ids) - ref).max() < 0.05

    # A k-quant's 256-weight blocks fit nothing here: everything stays float, nothing fails.
    other = mc.Model.from_config(config, seed=0)
    with pytest.warns(UserWarning, match="block size 256"):
        mc.quantize_model(other, "q4_k")
    assert not other.is_quantized and other.last_quantization_report["quantized"] == {}


def test_mixed_formats_skip_and_bad_formats(fixtures):
    model = mc.load_model(fixtures / "tiny-llama")
    spec = {
        "*.mlp.*": "q4_0",
        "*self_attn*": "q8_0",
        "*.self_attn.v_proj": "f32",
        "model.layers.1.mlp.up_proj": "f32",
    }
    mc.quantize_model(model, spec)
    info = model.quantization_info()
    assert info["format"] == "mixed"
    assert info["layers"]["model.layers.0.mlp.up_proj"]["format"] == "q4_0"
    assert info["layers"]["model.layers.1.self_attn.o_proj"]["format"] == "q8_0"
    # Exact names win, then longer patterns over shorter ones.
    assert {"model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"} <= set(info["float_layers"])
    assert {"model.embed_tokens", "lm_head", "model.layers.0.mlp.down_proj"} <= set(info["float_layers"])
    kept = model.last_quantization_report["kept_float"]
    assert kept["lm_head"] == "not selected" and "176" in kept["model.layers.0.mlp.down_proj"]

    skipped = mc.quantize_model(mc.load_model(fixtures / "tiny-llama"), "q8_0", skip=["lm_head", "*embed*"])
    assert {"lm_head", "model.embed_tokens"} <= set(skipped.quantization_info()["float_layers"])

    with pytest.raises(ValueError, match=r"unknown quantization format 'q9_0' \(expected one of: .*q8_0"):
        mc.quantize_model(model, "q9_0")
    with pytest.raises(ValueError, match="unknown quantization format"):
        model._core.quantize("q3", {}, [])  # the core checks too
    with pytest.raises(TypeError):
        mc.quantize_model(model, 8)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-gpt2"])
def test_dequantize_gives_a_float_model_holding_the_rounded_weights(fixtures, tmp_path, name):
    original = mc.load_model(fixtures / name)
    names = original.parameter_names()
    model = quantized(fixtures, name, "q8_0")
    assert len(model.parameter_names()) < len(names)  # quantized matrices are not float parameters
    q_logits = model.forward(IDS)

    assert mc.dequantize_model(model) is model
    assert not mc.is_model_quantized(model) and not model.quantization_info()["quantized"]
    assert model.parameter_names() == names
    for n in names:
        w, w0 = model.get_parameter(n), original.get_parameter(n)
        assert w.dtype == np.float32 and w.shape == w0.shape
        if w.ndim == 2 and not n.endswith("wpe.weight"):  # [out, in], GPT-2's Conv1D included
            # q8_0 keeps each block of 32 as round(w / d) * d with d = absmax / 127 stored as f16:
            # every weight moves by at most half a step, plus 127 times d's f16 rounding (2^-11 relative).
            blocks = w0.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(w.reshape(-1, 32) - blocks)
            assert (err <= (0.5 + 127 / 2048) * step).all(), n
            assert err.max() > 0, n
    # Same weights; only the 8-bit rounding of the activations inside the quantized kernel differs.
    d = np.abs(model.forward(IDS) - q_logits)
    print(f"{name}: dequantized vs quantized max|d| {d.max():.4f} mean|d| {d.mean():.5f}")
    assert d.max() < 0.15 and d.mean() < 0.02
    # q8_0 is idempotent on its own grid: re-quantizing gives back the quantized model exactly.
    np.testing.assert_array_equal(mc.quantize_model(model, "q8_0").forward(IDS), q_logits)
    # The dequantized model is a standard float model: it saves as safetensors and trains in full.
    mc.dequantize_model(model)
    model.save_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(mc.load_model(tmp_path / "hf").forward(IDS), model.forward(IDS))
    mc.Trainer(model, mc.AdamW(lr=1e-3)).step(IDS[:2])


@pytest.mark.parametrize("name", MODELS)
def test_gguf_round_trip(fixtures, tmp_path, name):
    tokenizer = mc.load_tokenizer(fixtures / name)
    for fmt in ("q8_0", "q4_0"):
        model = quantized(fixtures, name, fmt)
        path = tmp_path / f"{fmt}.gguf"
        model.save_gguf(path, tokenizer)
        loaded = mc.load_model(path)
        assert loaded.architecture == model.architecture and loaded.config == model.config
        assert loaded.quantization_info()["layers"] == model.quantization_info()["layers"]
        np.testing.assert_array_equal(loaded.forward(IDS), model.forward(IDS))

    meta = _core.gguf_metadata(str(path))
    assert meta["general.file_type"] == 2  # llama.cpp's MOSTLY_Q4_0
    assert json.loads(meta["metalcandle.config_json"]) == model.config
    text = (fixtures / "corpus.txt").read_text(encoding="utf-8")[:4000] + "<|im_start|>hi<|im_end|> é"
    tok = mc.load_tokenizer(path)
    assert tok.encode(text) == tokenizer.encode(text) and len(tok) == len(tokenizer)
    assert tok.decode(tokenizer.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert tok.eos_token_id == tokenizer.eos_token_id

    # A float model round-trips bit for bit, and stays float.
    model = mc.load_model(fixtures / name)
    model.save_gguf(tmp_path / "f32.gguf", fixtures / name)
    loaded = mc.load_model(tmp_path / "f32.gguf")
    assert not loaded.is_quantized
    np.testing.assert_array_equal(loaded.forward(IDS), model.forward(IDS))
    for n in model.parameter_names():
        np.testing.assert_array_equal(loaded.get_parameter(n), model.get_parameter(n))


def test_gguf_without_tokenizer_and_bad_files(fixtures, tmp_path):
    model = quantized(fixtures, "tiny-qwen2")
    model.save_gguf(tmp_path / "m.gguf")
    assert _core.gguf_tokenizer_json(str(tmp_path / "m.gguf")) is None
    with pytest.raises(FileNotFoundError, match="embeds no tokenizer"):
        mc.load_tokenizer(tmp_path / "m.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        mc.load_model(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError):
        mc.load_model(tmp_path / "missing.gguf")
    # Greedy decoding with the KV cache on a loaded quantized model.
    loaded = mc.load_model(tmp_path / "m.gguf")
    prompt = np.load(fixtures / "tiny-qwen2" / "golden.npz")["gen_prompt"]
    np.testing.assert_array_equal(
        loaded.generate(prompt, 8, eos_token_id=[]), model.generate(prompt, 8, eos_token_id=[])
    )


def test_calibration_plan(fixtures):
    model = mc.load_model(fixtures / "tiny-qwen2")
    batches = np.load(fixtures / "tiny-qwen2" / "lora" / "trajectory.npz")["batches"][:4]
    ref = model.forward(IDS)
    plans = {
        tol: mc.prepare_model_for_quantization(model, batches, tolerance=tol) for tol in (0.5, 0.05, 0.002)
    }
    assert not model.is_quantized  # calibration leaves the weights alone
    np.testing.assert_array_equal(model.forward(IDS), ref)

    loose, mid, tight = plans.values()
    modules = set(
        mc.quantize_model(mc.load_model(fixtures / "tiny-qwen2"), "q8_0").quantization_info()["layers"]
    )
    for plan in plans.values():
        assert set(plan.formats) == modules
        assert set(plan.formats.values()) <= {"q4_0", "q5_0", "q8_0"}
    bits = mc.quantize.BITS_PER_WEIGHT
    for m in modules:
        stats = tight.stats[m]
        assert stats["rows"] > 0 and stats["input_absmax"] > stats["input_rms"] > 0
        errors = stats["errors"]
        assert errors["q8_0"] < errors["q5_0"] < errors["q4_0"]
        # Tighter tolerance never picks fewer bits, and the choice is the cheapest one within it.
        assert bits[loose.formats[m]] <= bits[mid.formats[m]] <= bits[tight.formats[m]]
        for tol, plan in plans.items():
            within = [f for f in ("q4_0", "q5_0", "q8_0") if errors[f] <= tol]
            assert plan.formats[m] == (within[0] if within else "q8_0")
    assert set(loose.formats.values()) == {"q4_0"} and set(tight.formats.values()) == {"q8_0"}
    print(mid.summary())
    assert "tolerance 0.05" in str(mid)

    q = mc.quantize_model(model, mid)
    assert {k: v["format"] for k, v in q.quantization_info()["layers"].items()} == mid.formats

    skip_plan = mc.prepare_model_for_quantization(
        mc.load_model(fixtures / "tiny-llama"), batches[0], skip=["lm_head"]
    )
    assert skip_plan.formats["lm_head"] == "f32"
    assert skip_plan.formats["model.layers.0.mlp.down_proj"] == "f32"  # 176 fits no candidate
    assert skip_plan.stats["model.layers.0.mlp.down_proj"]["errors"]["q8_0"] is None
    with pytest.raises(ValueError, match="already quantized"):
        mc.prepare_model_for_quantization(model, batches)
    with pytest.raises(ValueError, match="unknown quantization format"):
        mc.prepare_model_for_quantization(mc.load_model(fixtures / "tiny-qwen2"), batches, candidates=["q7"])


def test_lora_on_a_quantized_base(fixtures, tmp_path):
    model = quantized(fixtures, "tiny-qwen2", "q4_0")
    layers = model.quantization_info()["layers"]
    model.add_lora(r=4, alpha=8, target_modules="all-linear", seed=0)
    trainable = model.trainable_parameters()
    assert len(trainable) == 28 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = np.load(fixtures / "tiny-qwen2" / "lora" / "trajectory.npz")["batches"][0]
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-2))
    losses = [trainer.step(batch).loss for _ in range(6)]
    print("QLoRA losses:", " ".join(f"{x:.4f}" for x in losses))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < losses[0] - 0.5
    assert model.is_quantized and model.quantization_info()["layers"] == layers

    # The adapter saves in PEFT's format and goes back onto a freshly quantized base.
    model.save_adapter(tmp_path / "adapter")
    again = quantized(fixtures, "tiny-qwen2", "q4_0")
    again.load_adapter(tmp_path / "adapter")
    np.testing.assert_allclose(again.forward(IDS), model.forward(IDS), atol=1e-5)

    with pytest.raises(ValueError, match="cannot merge an adapter into a quantized weight"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="quantized.*GGUF"):
        model.save_pretrained(tmp_path / "hf")


def test_full_fine_tuning_of_a_quantized_model_raises(fixtures):
    model = quantized(fixtures, "tiny-llama")
    with pytest.raises(ValueError, match="quantized model cannot be trained in full"):
        mc.Trainer(model, mc.AdamW(lr=1e-3)).step(IDS[:2])


def test_cli_quantize(capsys, tmp_path, fixtures):
    (tmp_path / "corpus.txt").write_text("hello world\n")
    cfg = write_config(tmp_path / "q.toml", "q", tmp_path / "run", tmp_path / "models", steps=2,
                       template=PRETRAINED_TOML, base=fixtures / "tiny-llama")  # fmt: skip
    out = tmp_path / "quant"
    code, stdout, err = run_cli(capsys, "quantize", cfg, "--format", "q4_0", "--out", out)
    print(stdout)
    assert code == 0, err
    assert "format: q4_0" in stdout and "layers: 14 quantized, 2 kept float" in stdout
    assert "kept float: model.layers.0.mlp.down_proj (input size 176" in stdout
    assert "x smaller" in stdout
    assert {"model.gguf", "tokenizer.json", "config.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    expected = quantized(fixtures, "tiny-llama", "q4_0").forward(IDS)
    np.testing.assert_array_equal(mc.load_model(out / "model.gguf").forward(IDS), expected)
    np.testing.assert_array_equal(mc.load_model(out).forward(IDS), expected)  # the folder loads too
    assert json.loads((out / "config.json").read_text()) == mc.load_model(fixtures / "tiny-llama").config
    original = mc.load_tokenizer(fixtures / "tiny-llama")
    assert mc.load_tokenizer(out).encode("Hello there") == original.encode("Hello there")
    assert mc.load_tokenizer(out / "model.gguf").encode("Hello there") == original.encode("Hello there")

    # A LoRA checkpoint is merged into its base before quantizing.
    adapter = tmp_path / "adapter"
    shutil.copytree(fixtures / "tiny-qwen2" / "lora" / "adapter_final", adapter)
    (adapter / "metadata.json").write_text(json.dumps({"base_model_path": str(fixtures / "tiny-qwen2")}))
    code, stdout, err = run_cli(
        capsys, "quantize", cfg, "--checkpoint", adapter, "--out", tmp_path / "merged", "--skip", "*embed*"
    )
    assert code == 0, err
    assert "LoRA adapter merged" in stdout and "model.embed_tokens (not selected)" in stdout
    want = mc.load_model(fixtures / "tiny-qwen2")
    want.load_adapter(adapter)
    want.merge_adapter()
    want.remove_adapter()
    mc.quantize_model(want, "q8_0", skip=["*embed*"])
    np.testing.assert_array_equal(mc.load_model(tmp_path / "merged").forward(IDS), want.forward(IDS))

    for argv, message in [
        (("--format", "q9", "--out", out), "invalid choice: 'q9'"),
        ((), "the following arguments are required: --out"),
        (("--out", out, "--checkpoint", tmp_path / "nowhere"), "does not exist"),
        (("--out", cfg), "is not a folder"),
    ]:
        code, _, err = run_cli(capsys, "quantize", cfg, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err

    with pytest.raises(SystemExit) as e:
        main(["quantize", "--help"])
    assert e.value.code == 0 and "usage: metalcandle quantize" in capsys.readouterr().out


def fake_checkpoint(folder, seed, stopped_early=False):
    """A loadable checkpoint folder (weights, tokenizer, state.json) without training for it."""
    tokenizer = mc.CharTokenizer()
    model = mc.Model.from_config(
        {"model_type": "custom-transformer", "vocab_size": tokenizer.vocab_size, "d_model": 32,
         "n_layers": 1, "n_heads": 4, "d_ff": 64, "max_seq_len": 32},
        seed=seed,
    )  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save(folder)
    (folder / "state.json").write_text(json.dumps({"step": 2, "stopped_early": stopped_early}))
    return model


def test_cli_quantize_picks_the_runs_final_checkpoint(capsys, tmp_path):
    (tmp_path / "corpus.txt").write_text("hello world\n")
    cfg = write_config(tmp_path / "s.toml", "s", tmp_path / "run", tmp_path / "models", steps=2)
    code, _, err = run_cli(capsys, "quantize", cfg, "--out", tmp_path / "q")
    assert code == 2 and "no checkpoint in" in err and err.count("\n") == 1

    ckpts = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpts / "step-1", seed=1)
    last = fake_checkpoint(ckpts / "step-2", seed=2)
    ids = IDS[:, :16] % 99
    code, out, err = run_cli(capsys, "quantize", cfg, "--out", tmp_path / "q")
    assert code == 0, err
    assert f"model: {ckpts / 'step-2'}" in out
    want = mc.quantize_model(last, "q8_0").forward(ids)
    np.testing.assert_array_equal(mc.load_model(tmp_path / "q").forward(ids), want)
    assert mc.load_tokenizer(tmp_path / "q").encode("hi") == mc.CharTokenizer().encode("hi")

    # A run that stopped early ends on its best checkpoint.
    best = fake_checkpoint(tmp_path / "run" / "best", seed=3)
    fake_checkpoint(ckpts / "step-3", seed=4, stopped_early=True)
    code, out, err = run_cli(capsys, "quantize", cfg, "--out", tmp_path / "q", "--format", "q4_0")
    assert code == 0 and f"model: {tmp_path / 'run' / 'best'}" in out, err
    want = mc.quantize_model(best, "q4_0").forward(ids)
    np.testing.assert_array_equal(mc.load_model(tmp_path / "q" / "model.gguf").forward(ids), want)


def test_bits_per_weight_are_ggmls_block_sizes():
    # Bytes per block over weights per block, from ggml's block structs (scales, mins, quants).
    blocks = {
        "q4_0": (2 + 16, 32),
        "q4_1": (4 + 16, 32),
        "q5_0": (2 + 4 + 16, 32),
        "q5_1": (4 + 4 + 16, 32),
        "q8_0": (2 + 32, 32),
        "q2_k": (16 + 64 + 4, 256),
        "q3_k": (32 + 64 + 12 + 2, 256),
        "q4_k": (4 + 12 + 128, 256),
        "q5_k": (4 + 12 + 32 + 128, 256),
        "q6_k": (128 + 64 + 16 + 2, 256),
    }
    assert mc.quantize.BITS_PER_WEIGHT == {f: 8 * b / n for f, (b, n) in blocks.items()}
    assert list(mc.quantize.FORMATS) == sorted(blocks, key=lambda f: 8 * blocks[f][0] / blocks[f][1])

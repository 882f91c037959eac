"""Quantization-aware training: a step trains through the rounding the final quantization applies
(against the quantize-then-dequantize reference), the float weights stay float, LoRA rounds the merged
weight, calibration plans can drive it, and `[quantization] qat` in a run config ends in a GGUF of
that format."""

import numpy as np
import pytest

import metalcandle as mc
from conftest import run_cli, weights, write_config, write_corpus
from metalcandle.model import load_model

pytestmark = pytest.mark.filterwarnings("ignore:kept in float32")

IDS = np.random.default_rng(0).integers(0, 384, size=(4, 16))


def rounded(fixtures, fmt="q4_0"):
    """The fixture model with the values `fmt` stores: what QAT's steps must see."""
    return mc.dequantize_model(mc.quantize_model(mc.load_model(fixtures / "tiny-qwen2"), fmt))


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_a_qat_step_is_the_rounded_models_step_applied_to_the_float_weights(fixtures, fmt):
    model = mc.load_model(fixtures / "tiny-qwen2")
    report = mc.enable_qat(model, fmt)
    assert model.qat == report["quantized"] and set(model.qat.values()) == {fmt}
    ref = rounded(fixtures, fmt)
    qat_trainer, ref_trainer = mc.Trainer(model, mc.SGD(lr=0.5)), mc.Trainer(ref, mc.SGD(lr=0.5))
    # Evaluation scores the rounded weights, so it is the quantized model's score to the bit.
    assert qat_trainer.eval_loss(IDS) == ref_trainer.eval_loss(IDS)
    float_loss = mc.Trainer(mc.load_model(fixtures / "tiny-qwen2"), mc.SGD()).eval_loss(IDS)
    assert qat_trainer.eval_loss(IDS) != float_loss

    before, ref_before = weights(model), weights(ref)
    got, want = qat_trainer.step(IDS), ref_trainer.step(IDS)
    assert qat_trainer.last_step_path == "fused"
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert got.grad_norm == pytest.approx(want.grad_norm, rel=1e-5)
    after, ref_after = weights(model), weights(ref)
    for name in before:
        # Straight through: the float weights move by the rounded model's update...
        np.testing.assert_allclose(after[name] - before[name], ref_after[name] - ref_before[name], atol=2e-6)
    # ...and stay float: a rounded copy would equal the reference's weights.
    rounded_names = [n + ".weight" for n in model.qat]
    assert all(not np.array_equal(after[n], ref_after[n]) for n in rounded_names)

    mc.disable_qat(model)
    assert model.qat is None
    assert qat_trainer.eval_loss(IDS) != ref_trainer.eval_loss(IDS)


def lora_model(fixtures):
    """The fixture model with an adapter two AdamW steps in (B is no longer zero): the same bits
    every call."""
    model = mc.load_model(fixtures / "tiny-qwen2")
    model.add_lora(r=4, alpha=8, target_modules="all-linear", seed=3)
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-2))
    for _ in range(2):
        trainer.step(IDS)
    return model, trainer


def test_qat_with_lora_rounds_the_merged_weight(fixtures):
    model, trainer = lora_model(fixtures)
    base = weights(model)
    mc.enable_qat(model, "q4_0")

    # The reference: merge, then quantize and dequantize, as `metalcandle quantize` does.
    merged, _ = lora_model(fixtures)
    merged.merge_adapter()
    merged.remove_adapter()
    ref = mc.Trainer(mc.dequantize_model(mc.quantize_model(merged, "q4_0")), mc.SGD()).eval_loss(IDS)
    assert trainer.eval_loss(IDS) == pytest.approx(ref, rel=1e-5)

    stats = trainer.step(IDS)
    assert trainer.last_step_path == "fused"
    assert stats.loss == pytest.approx(ref, rel=1e-5)
    for name, value in weights(model).items():
        np.testing.assert_array_equal(value, base[name], err_msg=f"{name}: the frozen base changed")


def test_a_calibration_plan_can_drive_qat(fixtures):
    model = mc.load_model(fixtures / "tiny-qwen2")
    plan = mc.prepare_model_for_quantization(model, IDS, candidates=("q4_0", "q8_0"), tolerance=0.1, qat=True)
    assert model.qat == {k: v for k, v in plan.formats.items() if v != "f32"}
    mc.quantize_model(model, plan)
    assert model.qat is None  # the weights now hold the formats QAT rounded to


def test_qat_refuses_what_it_cannot_round(fixtures):
    model = mc.quantize_model(mc.load_model(fixtures / "tiny-qwen2"), "q8_0")
    with pytest.raises(ValueError, match="already quantized"):
        mc.enable_qat(model, "q4_0")
    model = mc.load_model(fixtures / "tiny-qwen2")
    with pytest.raises(ValueError, match="no matrix takes.*block size 256"):
        mc.enable_qat(model, "q4_k")
    with pytest.raises(ValueError, match="unknown quantization format"):
        mc.enable_qat(model, "q3")
    assert model.qat is None


QAT_SECTION = """
[quantization]
qat = "{fmt}"
"""


def test_a_qat_run_config_trains_and_quantizes_to_its_format(workdir, capsys):
    write_corpus(workdir)
    cfg = write_config(workdir / "cfg.toml", "qat", workdir / "out", workdir / "models", steps=6)
    with open(cfg, "a") as f:
        f.write(QAT_SECTION.format(fmt="q4_0"))
    code, out, err = run_cli(capsys, "train", cfg)
    assert code == 0, err
    assert "quantization-aware training:" in err and "rounded to q4_0" in err

    code, out, err = run_cli(capsys, "eval", cfg)
    assert code == 0, err
    code, out, err = run_cli(capsys, "quantize", cfg, "--out", workdir / "q")
    assert code == 0, err
    assert "format: q4_0" in out
    info = load_model(workdir / "q" / "model.gguf").quantization_info()
    assert info["format"] == "q4_0"

    # A bad format names the key.
    bad = workdir / "bad.toml"
    bad.write_text(cfg.read_text().replace('qat = "q4_0"', 'qat = "q3"'))
    code, out, err = run_cli(capsys, "train", bad)
    assert code == 2 and "quantization.qat" in err

"""Interop with the real peft + transformers + torch, both ways: adapters and merged models written
here load there, and adapters written by peft load here, with the same logits (tolerances from the
fixtures' README). Marker `interop`: skipped unless all three packages are installed, and required
(a failure otherwise) under METALCANDLE_INTEROP=1, as in .ci/run's interop stage."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metalcandle as mc
from conftest import ATOL_FORWARD, LAYERED_MODELS, MODELS, require

pytestmark = pytest.mark.interop
torch = require("torch")
transformers = require("transformers")
peft = require("peft")

# ATOL_FORWARD is the README's bound for `logits` and `lora_logits_step0_nonzeroB`. Every comparison
# here runs the same weights on both sides (no training in between), a plain or an unmerged LoRA
# forward, so none needs the looser `merged_logits*` bound, which allows for two optimizers drifting
# apart.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# An adapter far enough from the base that loading it wrongly (or not at all) cannot pass.
MIN_ADAPTER_EFFECT = 0.1


@pytest.fixture(scope="module")
def qwen(fixtures):
    return fixtures / "tiny-qwen2"


@pytest.fixture(scope="module")
def golden(qwen):
    return np.load(qwen / "golden.npz")


def hf_model(folder):
    # Eager attention and float32, as the fixtures were made.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    return model.float().eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def test_adapter_saved_here_loads_in_peft(qwen, golden, tmp_path):
    ids = golden["input_ids"]
    model = mc.load_model(qwen)
    model.add_lora(r=4, alpha=8, target_modules=TARGETS, seed=0)
    # B starts at zero, which would make any loader look right; two steps make it non-zero.
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-2, weight_decay=0.01), max_grad_norm=1.0)
    for batch in np.load(qwen / "lora" / "trajectory.npz")["batches"][:2]:
        trainer.step(batch, labels=batch)
    model.save_adapter(tmp_path / "adapter")
    ours = model.forward(ids)
    assert np.abs(ours - golden["logits"]).max() > MIN_ADAPTER_EFFECT

    theirs = hf_logits(peft.PeftModel.from_pretrained(hf_model(qwen), str(tmp_path / "adapter")).eval(), ids)
    np.testing.assert_allclose(theirs, ours, atol=ATOL_FORWARD, rtol=0)


def test_adapter_saved_by_peft_loads_here(qwen, golden, tmp_path):
    ids = golden["input_ids"]
    torch.manual_seed(0)  # lora_A's kaiming init
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=TARGETS
    )
    peft_model = peft.get_peft_model(hf_model(qwen), config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, so the adapter would do nothing
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path / "peft-adapter"))
    theirs = hf_logits(peft_model.eval(), ids)
    assert np.abs(theirs - golden["logits"]).max() > MIN_ADAPTER_EFFECT

    model = mc.load_model(qwen)
    model.load_adapter(tmp_path / "peft-adapter")
    np.testing.assert_allclose(model.forward(ids), theirs, atol=ATOL_FORWARD, rtol=0)


@pytest.mark.parametrize("suffix", ["", "_nonzeroB"])
def test_merged_model_saved_here_loads_in_transformers(qwen, golden, tmp_path, suffix):
    ids = golden["input_ids"]
    model = mc.load_model(qwen)
    model.load_adapter(qwen / "lora" / f"adapter_final{suffix}")
    model.merge_adapter()
    model.save_pretrained(tmp_path / "merged")
    ours = model.forward(ids)
    assert np.abs(ours - golden["logits"]).max() > MIN_ADAPTER_EFFECT

    theirs = hf_logits(hf_model(tmp_path / "merged"), ids)
    np.testing.assert_allclose(theirs, ours, atol=ATOL_FORWARD, rtol=0)
    # And both agree with peft's own merge_and_unload of the same adapter.
    merged_by_peft = np.load(qwen / "lora" / "trajectory.npz")[f"merged_logits{suffix}"]
    np.testing.assert_allclose(theirs, merged_by_peft, atol=ATOL_FORWARD, rtol=0)


# The layered Qwen2 checkpoints check that config.json keeps each layer's window on the way out.
@pytest.mark.parametrize("name", MODELS + LAYERED_MODELS)
def test_checkpoint_saved_here_loads_in_transformers(fixtures, tmp_path, name):
    golden = np.load(fixtures / name / "golden.npz")
    mc.load_model(fixtures / name).save_pretrained(tmp_path / name)
    theirs = hf_logits(hf_model(tmp_path / name), golden["input_ids"])
    np.testing.assert_allclose(theirs, golden["logits"], atol=ATOL_FORWARD, rtol=0)


@pytest.fixture(scope="module")
def fresh_lora(fixtures, tmp_path_factory):
    """The LoRA part of the fixtures regenerated now with peft (tests/fixtures/generate.py)."""
    out = tmp_path_factory.mktemp("fresh-fixtures")
    script = Path(__file__).resolve().parent / "fixtures" / "generate.py"
    cmd = [sys.executable, str(script), str(out), "--corpus", str(fixtures / "corpus.txt"), "--only", "lora"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
@pytest.mark.parametrize("suffix", ["", "_nonzeroB"])
def test_lora_trajectory_matches_freshly_regenerated_peft(fresh_lora, tmp_path, suffix, fused):
    from test_training import test_lora_trajectory_matches_peft as check

    check(fresh_lora, tmp_path, suffix, fused)

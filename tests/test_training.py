"""LoRA and full fine-tuning match peft + torch step for step (fixtures' README tolerances)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import metalcandle as mc
from conftest import ATOL_FORWARD, MODELS

# Fixtures' README: losses, grad norms, trained weights, logits after our own training run
# (merged_logits*, final_logits); a forward of given weights (logits, lora_logits_step0_nonzeroB)
# uses conftest's ATOL_FORWARD.
ATOL_LOSS, RTOL_NORM, ATOL_WEIGHTS, ATOL_TRAINED_LOGITS = 3e-5, 3e-5, 5e-4, 5e-4


def run(trainer, batches):
    stats = [trainer.step(b, labels=b) for b in batches]
    return np.array([s.loss for s in stats]), np.array([s.grad_norm for s in stats])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "composed"])
@pytest.mark.parametrize("suffix", ["", "_nonzeroB"])
def test_lora_trajectory_matches_peft(fixtures, tmp_path, suffix, fused):
    lora = fixtures / "tiny-qwen2" / "lora"
    tr = np.load(lora / "trajectory.npz")
    model = mc.load_model(fixtures / "tiny-qwen2")
    model.load_adapter(lora / f"adapter_step0{suffix}")
    trainer = mc.Trainer(
        model,
        mc.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        max_grad_norm=1.0,
        fused=fused,
    )
    losses, norms = run(trainer, tr["batches"])
    assert trainer.last_step_path == ("fused" if fused else "composed"), trainer.last_composed_reason
    np.testing.assert_allclose(losses, tr[f"losses{suffix}"], atol=ATOL_LOSS, rtol=0)
    np.testing.assert_allclose(norms, tr[f"grad_norms{suffix}"], rtol=RTOL_NORM, atol=0)
    model.save_adapter(tmp_path / "adapter")
    ours, ref = (
        load_file(tmp_path / "adapter" / "adapter_model.safetensors"),
        load_file(lora / f"adapter_final{suffix}" / "adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(ref) and len(ref) == 28
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], atol=ATOL_WEIGHTS, rtol=0)
    model.merge_adapter()
    np.testing.assert_allclose(
        model.forward(tr["input_ids"]), tr[f"merged_logits{suffix}"], atol=ATOL_TRAINED_LOGITS, rtol=0
    )


def test_unmerged_lora_forward_and_merge_unmerge(fixtures):
    tr = np.load(fixtures / "tiny-qwen2" / "lora" / "trajectory.npz")
    model = mc.load_model(fixtures / "tiny-qwen2")
    base = model.forward(tr["input_ids"])
    model.load_adapter(fixtures / "tiny-qwen2" / "lora" / "adapter_step0_nonzeroB")
    unmerged = model.forward(tr["input_ids"])
    np.testing.assert_allclose(unmerged, tr["lora_logits_step0_nonzeroB"], atol=ATOL_FORWARD, rtol=0)
    model.merge_adapter()
    np.testing.assert_allclose(model.forward(tr["input_ids"]), unmerged, atol=ATOL_FORWARD, rtol=0)
    model.unmerge_adapter()  # back to base weights + an active adapter branch
    np.testing.assert_allclose(model.forward(tr["input_ids"]), unmerged, atol=ATOL_FORWARD, rtol=0)
    model.remove_adapter()
    # W + 2BA - 2BA is W only up to float32 rounding.
    np.testing.assert_allclose(model.forward(tr["input_ids"]), base, atol=ATOL_FORWARD, rtol=0)


@pytest.mark.parametrize("suffix", ["", "_nonzeroB"])
def test_merged_model_saves_as_hf_folder_with_peft_merged_logits(fixtures, tmp_path, suffix):
    lora = fixtures / "tiny-qwen2" / "lora"
    tr = np.load(lora / "trajectory.npz")
    model = mc.load_model(fixtures / "tiny-qwen2")
    model.load_adapter(lora / f"adapter_final{suffix}")
    model.merge_adapter()
    model.save_pretrained(tmp_path / "merged")
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(saved) == sorted(load_file(fixtures / "tiny-qwen2" / "model.safetensors"))
    reloaded = mc.load_model(tmp_path / "merged").forward(tr["input_ids"])
    np.testing.assert_array_equal(reloaded, model.forward(tr["input_ids"]))
    # peft's merge_and_unload of this very adapter, run by transformers: no training in between, so the
    # forward tolerance, not the looser one that allows for our own optimizer's drift.
    np.testing.assert_allclose(reloaded, tr[f"merged_logits{suffix}"], atol=ATOL_FORWARD, rtol=0)


@pytest.mark.parametrize(
    "fused, checkpointing",
    [(True, False), (True, True), (False, False)],
    ids=["fused", "checkpointed", "composed"],
)
def test_full_finetuning_trajectory_matches_torch(fixtures, fused, checkpointing):
    full = fixtures / "tiny-llama" / "full"
    tr = np.load(full / "trajectory.npz")
    model = mc.load_model(fixtures / "tiny-llama")
    trainer = mc.Trainer(
        model,
        mc.AdamW(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
        max_grad_norm=1.0,
        gradient_checkpointing=checkpointing,
        fused=fused,
    )
    losses, norms = run(trainer, tr["batches"])
    assert trainer.last_step_path == ("fused" if fused else "composed"), trainer.last_composed_reason
    np.testing.assert_allclose(losses, tr["losses"], atol=ATOL_LOSS, rtol=0)
    np.testing.assert_allclose(norms, tr["grad_norms"], rtol=RTOL_NORM, atol=0)
    ref = load_file(full / "final_model.safetensors")
    for name in ref:
        np.testing.assert_allclose(
            model.get_parameter(name), ref[name], atol=ATOL_WEIGHTS, rtol=0, err_msg=name
        )
    np.testing.assert_allclose(
        model.forward(tr["input_ids"]), tr["final_logits"], atol=ATOL_TRAINED_LOGITS, rtol=0
    )


@pytest.mark.parametrize("name", MODELS)
def test_every_trainable_parameter_receives_a_gradient(fixtures, name):
    # lr=0 and no decay: the update is 0, but AdamW counts a step only for parameters with a gradient.
    batch = np.load(fixtures / name / "golden.npz")["input_ids"]
    for lora in (False, True):
        model = mc.load_model(fixtures / name)
        if lora:
            n = model.add_lora(r=2, alpha=4, target_modules="all-linear", seed=1)
            # GPT-2 and Phi-3 fuse q|k|v (and Phi-3 gate|up) into one linear each.
            assert n == model.num_layers * {"tiny-gpt2": 4, "tiny-phi3": 4}.get(name, 7)
        opt = mc.AdamW(lr=0.0, weight_decay=0.0)
        mc.Trainer(model, opt).step(batch)
        names = set(model.trainable_parameters())
        assert set(opt.steps()) == names and all(v == 1 for v in opt.steps().values())
        if not lora:
            assert names == set(model.parameter_names())


def test_gradient_accumulation_equals_one_big_batch(fixtures):
    b = np.load(fixtures / "tiny-llama" / "full" / "trajectory.npz")["batches"][0]
    labels = b.copy()
    labels[0, :10] = -100  # unequal token counts per micro-batch
    results = []
    for split in (False, True):
        model = mc.load_model(fixtures / "tiny-llama")
        trainer = mc.Trainer(model, mc.AdamW(lr=1e-3), max_grad_norm=1.0)
        s = (
            trainer.step([b[:1], b[1:]], labels=[labels[:1], labels[1:]])
            if split
            else trainer.step(b, labels=labels)
        )
        results.append((s.loss, s.grad_norm, model.get_parameter("model.layers.0.mlp.up_proj.weight")))
    assert abs(results[0][0] - results[1][0]) < 1e-5  # f32 sums in another order
    assert abs(results[0][1] / results[1][1] - 1) < 1e-5
    np.testing.assert_allclose(results[0][2], results[1][2], atol=1e-6, rtol=0)


def test_optimizer_state_round_trip_is_exact(fixtures, tmp_path):
    tr = np.load(fixtures / "tiny-qwen2" / "lora" / "trajectory.npz")
    batches = tr["batches"]

    def fresh():
        m = mc.load_model(fixtures / "tiny-qwen2")
        m.add_lora(r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=3)
        return m, mc.Trainer(m, mc.AdamW(lr=1e-2, no_decay=["bias", "norm"]))

    model, trainer = fresh()
    for b in batches[:3]:
        trainer.step(b)
    model.save_adapter(tmp_path / "ckpt")
    trainer.save_state(tmp_path / "ckpt")
    straight = [trainer.step(b).loss for b in batches[3:]]
    model2, trainer2 = fresh()
    model2.remove_adapter()
    model2.load_adapter(tmp_path / "ckpt")
    trainer2.load_state(tmp_path / "ckpt")
    assert trainer2.step_count == 3
    resumed = [trainer2.step(b).loss for b in batches[3:]]
    assert resumed == straight


def test_peft_adapter_config_and_init(fixtures, tmp_path):
    model = mc.load_model(fixtures / "tiny-qwen2")
    model.add_lora(r=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=0, layers_to_transform=[1])
    model.save_adapter(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 8
        and cfg["lora_alpha"] == 16
        and cfg["target_modules"] == ["q_proj", "v_proj"]
    )
    t = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert sorted(t) == [
        f"base_model.model.model.layers.1.self_attn.{m}_proj.{ab}.weight"
        for m in "qv"
        for ab in ("lora_A", "lora_B")
    ]
    a = t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert (
        a.shape == (8, 64) and np.abs(a).max() <= 1 / 8 and np.abs(a).max() > 0.1
    )  # U(-1/sqrt(in), 1/sqrt(in))
    assert not t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].any()
    # B = 0: an attached fresh adapter leaves the outputs unchanged.
    ids = np.load(fixtures / "tiny-qwen2" / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(model.forward(ids), mc.load_model(fixtures / "tiny-qwen2").forward(ids))


def test_bad_lora_and_optimizer_arguments(fixtures, tmp_path):
    model = mc.load_model(fixtures / "tiny-gpt2")
    with pytest.raises(ValueError, match=r"target_modules.*matches no linear.*c_attn"):
        model.add_lora(r=4, alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="r.*must be > 0"):
        model.add_lora(r=0, alpha=8, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="betas"):
        mc.AdamW(betas=(1.5, 0.9))
    with pytest.raises(FileNotFoundError):
        model.load_adapter(tmp_path / "missing")


# Peak resident memory in KiB. On Linux ru_maxrss keeps the parent's peak across fork + exec, so
# under a test runner that already holds a few hundred MB it would hide most of the child's growth;
# VmHWM belongs to the child's own address space.
PEAK_SCRIPT = """
import resource, sys, numpy as np, metalcandle as mc

def peak_kib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss // 1024 if sys.platform == "darwin" else rss

cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
       "num_attention_heads": 4, "vocab_size": 32000, "tie_word_embeddings": False}
model = mc.Model.from_config(cfg, seed=0)
if sys.argv[1] == "lora":
    model.add_lora(r=8, alpha=16, target_modules="all-linear")
ids = np.random.default_rng(0).integers(0, 32000, size=(1, 64))
trainer = mc.Trainer(model, mc.AdamW(lr=1e-3))
before = peak_kib()
trainer.step(ids)  # the first step allocates the gradients and both Adam moments
print(peak_kib() - before)
"""


def test_lora_step_allocates_no_gradient_for_frozen_weights():
    # Embedding and head are 2 x 32000 x 256 floats (65 MB): full training must hold their
    # gradients and Adam moments (3 x 65 MB more), LoRA none of it.
    # Separate processes, so each peak is its own; run side by side.
    procs = {
        mode: subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, mode], stdout=subprocess.PIPE, text=True)
        for mode in ("lora", "full")
    }
    growth = {}
    for mode, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, mode
        growth[mode] = int(out.strip()) / 1024  # MiB
    assert growth["full"] > 150, growth
    assert growth["lora"] < 0.25 * growth["full"], growth


def test_evaluate_is_the_token_weighted_mean_of_per_batch_losses(fixtures):
    # Reference: each batch's mean loss (one eval_loss call each) weighted by its label tokens,
    # counted here; a batch whose labels are all -100 adds nothing.
    trainer = mc.Trainer(mc.load_model(fixtures / "tiny-qwen2"), None)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 100, (2, 7)), rng.integers(0, 100, (3, 5))
    lb = b.copy()
    lb[:, 3:] = -100
    ignored = np.full_like(a, -100)
    batches = [(a, a), (b, lb), (a, ignored)]
    loss, tokens = trainer.evaluate(batches)
    counts = [int((lab[:, 1:] != -100).sum()) for _, lab in batches[:2]]
    means = [trainer.eval_loss(ids, labels=lab) for ids, lab in batches[:2]]
    assert tokens == sum(counts) == 2 * 6 + 3 * 2
    assert loss == pytest.approx(sum(m * n for m, n in zip(means, counts, strict=True)) / tokens, rel=1e-12)
    with pytest.raises(ValueError, match="no label tokens"):
        trainer.evaluate([(a, ignored)])

"""Dropout of a from-scratch spec: applied only while training, the same masks on the fused and
the composed path, drawn from the seed and the step (resume exactness with dropout is in
test_train_loop.py, whose runs use dropout 0.1)."""

import numpy as np
import pytest

import metalcandle as mc

CONFIG = {
    "model_type": "custom-transformer", "vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4,
    "d_ff": 64, "max_seq_len": 32, "norm": "rmsnorm", "mlp": "swiglu", "positions": "rope",
}  # fmt: skip


def model(dropout: float) -> mc.Model:
    return mc.Model.from_config({**CONFIG, "dropout": dropout}, seed=1)


def ids(seed=0):
    return np.random.default_rng(seed).integers(0, 50, size=(4, 24), dtype=np.int64)


def first_step(dropout: float, seed: int = 0, fused: bool = True):
    m = model(dropout)
    trainer = mc.Trainer(m, mc.AdamW(lr=1e-3), fused=fused, seed=seed)
    stats = trainer.step(ids())
    assert trainer.last_step_path == ("fused" if fused else "composed")
    return stats, {n: m.get_parameter(n) for n in m.parameter_names()}


def first_loss(dropout: float, seed: int = 0) -> float:
    return first_step(dropout, seed)[0].loss


def test_fused_and_composed_paths_draw_the_same_masks():
    (fused, w_fused), (composed, w_composed) = first_step(0.3), first_step(0.3, fused=False)
    assert fused.loss == pytest.approx(composed.loss, rel=1e-6)
    assert fused.grad_norm == pytest.approx(composed.grad_norm, rel=1e-5)
    for name, w in w_fused.items():
        # AdamW divides by |g|, so weights whose gradient is near 0 show the paths' rounding
        np.testing.assert_allclose(w, w_composed[name], atol=1e-5, err_msg=name)
    # and the masks do something: at this init the loss moves little, but AdamW's first step
    # (lr times the gradient's sign) moves many weights the other way
    _, w_plain = first_step(0.0)
    for name, w in w_plain.items():
        if "norm" not in name:
            assert np.mean(np.abs(w - w_fused[name]) > 1e-4) > 0.05, name


def test_masks_come_from_the_seed_and_the_step():
    assert first_loss(0.3, seed=5) == first_loss(0.3, seed=5)
    assert abs(first_loss(0.3, seed=5) - first_loss(0.3, seed=6)) > 1e-4
    # The same batch twice, weights unchanged (lr 0): the second step draws other masks.
    trainer = mc.Trainer(model(0.3), mc.AdamW(lr=0.0), seed=5)
    a, b = trainer.step(ids()).loss, trainer.step(ids()).loss
    assert abs(a - b) > 1e-4


def test_evaluation_generation_and_forward_are_deterministic():
    dropped, plain = model(0.5), model(0.0)
    x = ids(1)
    np.testing.assert_array_equal(dropped.forward(x), plain.forward(x))
    t_drop, t_plain = mc.Trainer(dropped, mc.AdamW(lr=1e-3)), mc.Trainer(plain, mc.AdamW(lr=1e-3))
    assert t_drop.eval_loss(x) == t_plain.eval_loss(x)
    t_drop.step(x)  # training in between leaves later evaluation deterministic
    assert t_drop.eval_loss(x) == t_drop.eval_loss(x)
    prompt = x[:1, :4]
    np.testing.assert_array_equal(
        dropped.generate(prompt, max_new_tokens=6), dropped.generate(prompt, max_new_tokens=6)
    )


def test_dropout_out_of_range_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="dropout"):
        model(1.0)

"""Experiment hooks from Python and from a run config: each changes what it should and nothing
else, and a model with hooks that change nothing trains bit for bit as one without."""

import re
from pathlib import Path

import numpy as np
import pytest

import metalcandle as mc
from conftest import SCRATCH_TOML, run_cli, split_metrics, weights, write_config
from metalcandle import train as T
from metalcandle.config import load_config
from metalcandle.errors import UserError
from metalcandle.hooks import describe_kinds, point_names
from metalcandle.loading import load_folder_tokenizer

IDS = np.array([[3, 9, 27, 1, 44, 8, 15, 2], [30, 7, 19, 5, 11, 12, 13, 14]], dtype=np.int64)
LR = 1e-2


@pytest.fixture
def model_dir(fixtures):
    return fixtures / "tiny-llama"


def trajectory(model, steps=3, **trainer_kw):
    trainer = mc.Trainer(model, mc.AdamW(lr=LR), **trainer_kw)
    stats = [trainer.step(IDS) for _ in range(steps)]
    return stats, weights(model)


def one_step(model):
    """Weights before and after one unclipped AdamW step without weight decay (a zero gradient
    moves nothing)."""
    before = weights(model)
    mc.Trainer(model, mc.AdamW(lr=LR, weight_decay=0.0), max_grad_norm=None).step(IDS)
    return before, weights(model)


def unchanged(before, after) -> set[str]:
    return {n for n in before if np.array_equal(before[n], after[n])}


# --- Python API ------------------------------------------------------------------------------------


def test_identity_hooks_and_zero_weight_aux_leave_the_trajectory_bit_identical(model_dir):
    # A hooked model takes the composed path; the reference runs there too, so the bits compare.
    want_stats, want_weights = trajectory(mc.load_model(model_dir), fused=False)
    model = mc.load_model(model_dir)
    seen = set()

    def identity(point, x):
        seen.add(point)
        return x

    model.add_forward_hook("*", identity)
    model.add_aux_loss("z_loss", weight=0.0)
    stats, got_weights = trajectory(model)
    assert seen == set(point_names(model.num_layers))
    assert [s.loss for s in stats] == [s.loss for s in want_stats]
    assert [s.grad_norm for s in stats] == [s.grad_norm for s in want_stats]
    assert all(np.array_equal(got_weights[n], want_weights[n]) for n in want_weights)
    # The zero-weight loss is still reported, apart from the main loss.
    assert all(set(s.aux) == {"z_loss"} and s.aux["z_loss"] > 0 for s in stats)
    assert all(not w.aux for w in want_stats)


def test_capture_matches_hidden_states_and_detaches_on_exit(model_dir):
    model = mc.load_model(model_dir)
    logits, hidden = model.forward(IDS, output_hidden_states=True)
    with model.capture(["layers.0.residual", "layers.*.mlp_out"]) as cap:
        model.forward(IDS)
        assert np.array_equal(cap["layers.0.residual"], hidden[1])
    assert sorted(cap) == ["layers.0.mlp_out", "layers.0.residual", "layers.1.mlp_out"]
    assert dict(cap)["layers.1.mlp_out"].shape == hidden[1].shape
    with pytest.raises(KeyError, match="no value captured at 'logits'"):
        cap["logits"]
    # Nothing stays attached: the model runs as before and captures nothing more.
    assert np.array_equal(model.forward(IDS), logits)
    assert model.take_captured() == {}

    with model.capture("layers.1.attn_probs", full=False) as stats:
        model.forward(IDS)
    s = stats["layers.1.attn_probs"]
    assert s["shape"] == [2, 4, 8, 8] and 0.0 <= s["min"] <= s["max"] <= 1.0
    # Each attention row sums to one, so the mean over rows of T keys is 1/T.
    assert s["mean"] == pytest.approx(1 / 8, rel=1e-5)


def test_forward_hook_adding_a_constant_shifts_the_logits(model_dir):
    model = mc.load_model(model_dir)
    base = model.forward(IDS)
    handle = model.add_forward_hook("logits", lambda point, x: x + 3.0)
    np.testing.assert_allclose(model.forward(IDS), base + 3.0, rtol=0, atol=1e-5)
    assert handle.remove() and not handle.remove()
    assert np.array_equal(model.forward(IDS), base)
    # As a context manager, and with a built-in kind.
    with model.add_forward_hook("logits", "scale", factor=0.5):
        np.testing.assert_allclose(model.forward(IDS), base * 0.5, rtol=1e-6)
    assert np.array_equal(model.forward(IDS), base)


def test_removed_hooks_restore_the_baseline_trajectory(model_dir):
    want_stats, want_weights = trajectory(mc.load_model(model_dir), steps=2)
    model = mc.load_model(model_dir)
    handles = [
        model.add_forward_hook("layers.*.mlp_out", lambda p, x: x * 0.0),
        model.add_backward_hook("embed", "stop_gradient"),
        model.add_update_hook("*", "sign"),
        model.add_aux_loss("activation_l2", 1.0, point="layers.*.residual"),
    ]
    assert model.forward(IDS).shape == (2, 8, 400)
    assert all(h.remove() for h in handles)
    stats, got = trajectory(model, steps=2)
    assert [s.loss for s in stats] == [s.loss for s in want_stats] and not stats[0].aux
    assert all(np.array_equal(got[n], want_weights[n]) for n in got)
    logits = model.forward(IDS)
    model.add_forward_hook("logits", "scale", factor=2.0)
    model.add_aux_loss("z_loss", 1.0)
    model.clear_hooks()
    assert np.array_equal(model.forward(IDS), logits)
    assert not mc.Trainer(model, mc.AdamW()).step(IDS).aux


def test_backward_hook_returning_zeros_stops_exactly_the_upstream_gradients(model_dir):
    model = mc.load_model(model_dir)
    calls = []

    def zero(point, grad):
        calls.append((point, grad.shape))
        return np.zeros_like(grad)

    model.add_backward_hook("layers.0.residual", zero)
    before, after = one_step(model)
    assert calls == [("layers.0.residual", (2, 8, 64))]
    upstream = {n for n in before if n.startswith("model.layers.0.")} | {"model.embed_tokens.weight"}
    assert unchanged(before, after) == upstream


def test_update_hook_sees_every_trainable_parameter_and_adamw_applies_its_gradient(model_dir):
    model = mc.load_model(model_dir)
    start = weights(model)
    seen = {}

    def edit(name, param, grad):
        seen[name] = (param.shape, grad.shape, np.array_equal(param, start[name]))
        if name == "model.layers.1.mlp.up_proj.weight":
            return np.zeros_like(grad)
        if name == "model.norm.weight":
            return np.full_like(grad, 0.5)
        if name == "lm_head.weight":
            return -2.0 * np.ones_like(grad, dtype=np.float64)  # converted to float32
        return None  # keeps the gradient

    model.add_update_hook("*", edit)
    before, after = one_step(model)
    assert seen == {n: (p.shape, p.shape, True) for n, p in start.items()}
    assert unchanged(before, after) == {"model.layers.1.mlp.up_proj.weight"}
    # First AdamW step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
    eps = 1e-8
    np.testing.assert_allclose(
        after["model.norm.weight"], before["model.norm.weight"] - LR * 0.5 / (0.5 + eps), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(after["lm_head.weight"], before["lm_head.weight"] + LR, rtol=0, atol=1e-6)


def test_update_hook_patterns_reach_lora_matrices(model_dir):
    model = mc.load_model(model_dir)
    with pytest.raises(ValueError, match="attach the LoRA adapter first"):
        model.add_update_hook("*lora_B*", "freeze")
    model.add_lora(r=2, target_modules=["q_proj"])
    names = []
    model.add_update_hook("*lora_A*", "freeze")
    model.add_update_hook("*", lambda name, p, g: names.append(name))
    before = model.trainable_parameters()
    mc.Trainer(model, mc.AdamW(lr=LR, weight_decay=0.0)).step(IDS)
    after = model.trainable_parameters()
    assert sorted(names) == sorted(n for n in before if "lora_B" in n)
    assert all(np.array_equal(before[n], after[n]) == ("lora_A" in n) for n in before)


def test_aux_losses_are_reported_and_change_the_update(model_dir):
    model = mc.load_model(model_dir)
    model.add_aux_loss("activation_l2", 0.5, point="layers.*.mlp_out")
    model.add_aux_loss("attention_entropy", 0.1)
    with model.capture("layers.*.mlp_out") as cap:
        stats = mc.Trainer(model, mc.AdamW()).step(IDS)
    want = np.mean([np.mean(cap[f"layers.{i}.mlp_out"].astype(np.float64) ** 2) for i in range(2)])
    assert set(stats.aux) == {"activation_l2[layers.*.mlp_out]", "attention_entropy[layers.*.attn_probs]"}
    assert stats.aux["activation_l2[layers.*.mlp_out]"] == pytest.approx(want, rel=1e-4)
    assert 0 < stats.aux["attention_entropy[layers.*.attn_probs]"] <= np.log(8)
    # The hooked model runs composed; the same path for the baseline, so the losses compare exactly.
    base = mc.Trainer(mc.load_model(model_dir), mc.AdamW(), fused=False).step(IDS)
    assert stats.loss == base.loss and stats.grad_norm != base.grad_norm


@pytest.mark.parametrize(
    "add, needle",
    [
        (lambda m: m.add_forward_hook("layer.0.mlp_out", "scale", factor=2), 'hook point "layer.0.mlp_out"'),
        (lambda m: m.add_forward_hook("layers.9.mlp_out", lambda p, x: x), 'hook point "layers.9.mlp_out"'),
        (lambda m: m.add_backward_hook("logit", "stop_gradient"), "did you mean 'logits'"),
        (lambda m: m.add_aux_loss("activation_l2", 1.0, point="mlp_out"), 'hook point "mlp_out"'),
        (lambda m: m.add_forward_hook("embed", "scal", factor=2), "did you mean 'scale'"),
        (lambda m: m.add_forward_hook("embed", "scale", facter=2), "did you mean 'factor'"),
        (lambda m: m.add_forward_hook("embed", "scale"), 'forward hook "scale": needs factor='),
        (lambda m: m.add_forward_hook("embed", "noise", std=1, seed=-1), "seed must be an integer >= 0"),
        (lambda m: m.add_forward_hook("embed", "ablate_heads", heads=[0]), "needs attn_scores or attn_probs"),
        (
            lambda m: m.add_forward_hook("layers.0.attn_probs", "ablate_heads", heads=[4]),
            "head 4 out of range",
        ),
        (lambda m: m.add_forward_hook("embed", "patch"), "needs array="),
        (lambda m: m.add_update_hook("layers.0.*", "freeze"), "matches no trainable parameter"),
        (lambda m: m.add_aux_loss("z_loss", 1.0, point="logits"), "z_loss takes no point"),
        (lambda m: m.add_aux_loss("attention_entropy", 1.0, point="layers.*"), "needs attn_probs points"),
    ],
)
def test_bad_points_kinds_and_parameters_are_named(model_dir, add, needle):
    model = mc.load_model(model_dir)
    with pytest.raises(ValueError) as e:
        add(model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_readme_lists_the_kinds_the_model_accepts(model_dir):
    listed = describe_kinds()
    assert listed in (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # Every built-in kind listed attaches through the public API with the parameters listed for it
    # (the optional ones left out), and one not listed does not.
    value = {"factor": 2.0, "std": 0.1, "max": 1.0, "heads": [0], "weight": 0.1, "min?": -1.0}
    model = mc.load_model(model_dir)
    point = "layers.0.attn_probs"
    attach = {
        "forward": lambda kind, kw: model.add_forward_hook(point, kind, **kw),
        "backward": lambda kind, kw: model.add_backward_hook(point, kind, **kw),
        "update": lambda kind, kw: model.add_update_hook("*", kind, **kw),
        "aux_loss": lambda kind, kw: model.add_aux_loss(kind, **{"weight": 0.1, **kw}),
    }
    seen = {}
    for line in listed.splitlines():
        section, items = re.fullmatch(r"- (\w+): (.*)", line).groups()
        kinds = re.findall(r'"(\w+)"(?: \(([^)]*)\))?', items)
        seen[section] = [k for k, _ in kinds]
        for kind, params in kinds:
            kw = {}
            for p in filter(None, params.split("; ")[0].split(", ")):
                if p == "array=":
                    kw["array"] = np.zeros((2, 4, 8, 8), np.float32)
                elif p == "point":
                    kw["point"] = point
                elif p in value:
                    kw[p.rstrip("?")] = value[p]
            attach[section](kind, kw)
        with pytest.raises(ValueError, match="unknown"):
            attach[section]("not_" + seen[section][0], {})
    assert list(seen) == ["forward", "backward", "update", "aux_loss"]
    model.forward(IDS)


def test_errors_inside_hook_functions_name_the_point(model_dir):
    # A result of the wrong shape is a ValueError wherever the hook runs: at a point between ops,
    # inside the attention, in the backward.
    model = mc.load_model(model_dir)
    for point, cut, shapes in [
        ("embed", lambda x: x[:, :3], r"\[2, 3, 64\], expected \[2, 8, 64\]"),
        ("layers.0.attn_probs", lambda x: x[:1], r"\[1, 4, 8, 8\], expected \[2, 4, 8, 8\]"),
    ]:
        with model.add_forward_hook(point, lambda p, x, cut=cut: cut(x)):
            for run in (model.forward, mc.Trainer(model, mc.AdamW()).step):
                with pytest.raises(ValueError, match=rf'^hook at "{point}" returned shape {shapes}$'):
                    run(IDS)
    with model.add_backward_hook("layers.1.attn_out", lambda p, g: g[:1]):
        shapes = r"\[1, 8, 64\], expected \[2, 8, 64\]"
        with pytest.raises(
            ValueError, match=rf'^backward hook at "layers.1.attn_out" returned shape {shapes}$'
        ):
            mc.Trainer(model, mc.AdamW()).step(IDS)
    with model.add_update_hook("*", lambda n, p, g: g[:1]):
        with pytest.raises(
            ValueError, match=r"^update hook on `[^`]+` returned shape \[1(, \d+)?\], expected \["
        ):
            mc.Trainer(model, mc.AdamW()).step(IDS)

    # The core's own input errors keep their kind through the attention op too: a patch of the
    # wrong shape at attn_probs.
    with model.add_forward_hook("layers.0.attn_probs", "patch", array=np.zeros((3,), np.float32)):
        for run in (model.forward, mc.Trainer(model, mc.AdamW()).step):
            with pytest.raises(ValueError, match="layers.0.attn_probs"):
                run(IDS)

    # An exception the function raises is a RuntimeError naming the point, caused by it.
    def boom(point, grad):
        raise KeyError("boom")

    for add in (model.add_forward_hook, model.add_backward_hook):
        for point in ("layers.1.attn_out", "layers.1.attn_scores"):
            with add(point, boom):
                section = "forward" if add == model.add_forward_hook else "backward"
                with pytest.raises(
                    RuntimeError, match=f"^{section} hook at \"{point}\": KeyError: 'boom'$"
                ) as e:
                    mc.Trainer(model, mc.AdamW()).step(IDS)
                assert isinstance(e.value.__cause__, KeyError)
    # Nothing of a failed call is left over for the next one.
    mc.Trainer(model, mc.AdamW()).step(IDS)
    model.forward(IDS)


# --- From a run config ---------------------------------------------------------------------------------


def write_run(workdir, name, hooks: str, steps=4):
    # Few steps, no evaluation or sampling before the end.
    template = SCRATCH_TOML.replace("eval_every = 5", "eval_every = 100").replace(
        "save_every = 5", "save_every = 2"
    )
    return write_config(workdir / f"{name}.toml", name, workdir / "runs" / name, workdir / "models", steps,
                        template + hooks)  # fmt: skip


def test_config_aux_loss_is_logged_on_every_training_line_fresh_and_resumed(workdir):
    cfg = load_config(write_run(workdir, "zl", '[[hooks.aux_loss]]\nkind = "z_loss"\nweight = 0.001\n'))
    T.train(cfg, progress=False, log=lambda m: None, stop_at_step=2)
    T.train(cfg, progress=False, log=lambda m: None)
    rows, _ = split_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["aux/z_loss"] > 0 for r in rows)


def test_config_freeze_everything_leaves_the_weights_as_initialised(workdir):
    cfg = load_config(write_run(workdir, "fz", '[[hooks.update]]\nkind = "freeze"\npattern = "*"\n'))
    result = T.train(cfg, progress=False, log=lambda m: None)
    trained = mc.load_model(result.final_dir)
    initial = T.build_model(cfg, None, load_folder_tokenizer(result.final_dir), None)
    assert trained.parameter_names() == initial.parameter_names()
    assert all(
        np.array_equal(trained.get_parameter(n), initial.get_parameter(n)) for n in trained.parameter_names()
    )
    rows, _ = split_metrics(cfg.output_dir)
    assert all(r["grad_norm"] == 0 for r in rows)


def test_config_bad_kind_exits_2_naming_the_key(capsys, workdir):
    cfg_file = write_run(workdir, "bad", '[[hooks.forward]]\nkind = "scal"\npoint = "embed"\nfactor = 2\n')
    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet")
    err = err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "hooks.forward[0].kind must be one of" in err and "(did you mean 'scale'?)" in err
    assert not (workdir / "runs" / "bad").exists()


def test_config_python_kind_is_refused(workdir):
    with pytest.raises(UserError, match=r'hooks.backward\[0\].kind = "python" is only available from Python'):
        load_config(write_run(workdir, "py", '[[hooks.backward]]\nkind = "python"\npoint = "embed"\n'))


def test_config_unknown_point_is_named_when_attached(capsys, workdir):
    cfg_file = write_run(
        workdir, "pt", '[[hooks.forward]]\nkind = "scale"\npoint = "layers.7.mlp_out"\nfactor = 2\n'
    )
    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet")
    err = err.strip()
    assert code == 2 and err.count("\n") == 0
    assert 'hooks.forward[0]: hook point "layers.7.mlp_out" matches no point of this model' in err


def test_overlapping_captures_each_get_what_their_own_hook_recorded(model_dir):
    model = mc.load_model(model_dir)
    logits = model.forward(IDS)
    outside = model.add_forward_hook("logits", "capture")
    with model.capture("logits") as full, model.capture("logits", full=False) as stats:
        model.forward(IDS)
    assert np.array_equal(full["logits"], logits)
    assert stats["logits"]["shape"] == list(logits.shape)
    assert stats["logits"]["max"] == pytest.approx(float(logits.max()), rel=1e-6)
    # A hook attached outside the blocks keeps its own value too.
    assert np.array_equal(model.take_captured()["logits"], logits)
    outside.remove()

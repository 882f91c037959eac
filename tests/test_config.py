"""Config validation: every error names the file and key and says what was expected."""

import numpy as np
import pytest
import tomllib

import metalcandle as mc
from conftest import MINIMAL_CONFIG
from metalcandle.config import (
    SCHEMA,
    apply_overrides,
    diff_configs,
    load_config,
    parse_override,
    to_toml,
    validate,
)
from metalcandle.errors import UserError
from metalcandle.loading import scratch_model_config
from metalcandle.templates import FROM_SCRATCH, LORA
from metalcandle.train import make_optimizer

MINIMAL = MINIMAL_CONFIG


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path, text, overrides=()):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_minimal_config_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    spec = cfg["model"]["spec"]
    assert spec["n_kv_heads"] == 4 and spec["d_ff"] == 128 and spec["max_seq_len"] == 32
    assert cfg["tokenizer"]["kind"] == "char"
    assert cfg["optimizer"]["betas"] == [0.9, 0.999]
    assert cfg["lora"] is None and not cfg.is_lora and cfg.from_scratch
    # Inputs resolve against the config's folder, outputs against the working directory.
    assert cfg.input_path("corpus.txt") == tmp_path / "corpus.txt"
    assert cfg.output_dir.name == "t" and cfg.output_dir.parent.name == "runs"
    # Every section of the schema is present after validation.
    assert set(cfg.sections) == set(SCHEMA)


def test_unknown_key_suggests_the_close_one(tmp_path):
    msg = error_of(tmp_path, MINIMAL.replace("max_steps = 5", "max_step = 5"))
    assert str(tmp_path / "cfg.toml") in msg
    assert "unknown key 'train.max_step'" in msg and "did you mean 'max_steps'?" in msg


def test_unknown_section_and_spec_key(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "[optimiser]\nlr = 1e-3\n")
    assert "unknown section [optimiser] (did you mean 'optimizer'?)" in msg
    msg = error_of(tmp_path, MINIMAL.replace("n_heads = 4", "n_head = 4"))
    assert "model.spec.n_head" in msg and "n_heads" in msg


@pytest.mark.parametrize(
    "line, needle",
    [
        ('seq_len = "long"', "data.seq_len must be an integer, got 'long'"),
        ("seq_len = 1", "data.seq_len must be an integer >= 2"),
        ("valid_fraction = 1.5", "data.valid_fraction must be a number >= 0.0 and <= 0.9"),
        ('format = "jsn"', 'data.format must be one of "auto", "text", "completions", "chat"'),
        ("packing = 1", "data.packing must be true or false"),
    ],
)
def test_type_and_range_errors(tmp_path, line, needle):
    text = MINIMAL.replace("seq_len = 32", line if line.startswith("seq_len") else "seq_len = 32\n" + line)
    assert needle in error_of(tmp_path, text)


def test_cross_key_checks(tmp_path):
    both = MINIMAL.replace("[model.spec]", '[model]\npath = "x"\n[model.spec]')
    assert "exactly one of 'name'" in error_of(tmp_path, both)
    assert "'max_steps' or 'epochs', not both" in error_of(
        tmp_path, MINIMAL.replace("max_steps = 5", "max_steps = 5\nepochs = 1")
    )
    assert "divisible by n_heads" in error_of(tmp_path, MINIMAL.replace("d_model = 32", "d_model = 30"))
    assert "must be <= model.spec.max_seq_len" in error_of(
        tmp_path, MINIMAL.replace("n_heads = 4", "n_heads = 4\nmax_seq_len = 16")
    )
    assert "[lora] needs a pretrained [model]" in error_of(tmp_path, MINIMAL + "[lora]\nr = 4\n")
    assert "missing required key 'run.name'" in error_of(tmp_path, MINIMAL.replace('name = "t"', ""))
    assert "invalid TOML" in error_of(tmp_path, MINIMAL + "[[[")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found: .*nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_overrides_parse_types(tmp_path):
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("optimizer.lr=3e-4") == (["optimizer", "lr"], 3e-4)
    assert parse_override("run.name=abc") == (["run", "name"], "abc")
    assert parse_override("data.packing=false") == (["data", "packing"], False)
    assert parse_override('lora.target_modules=["q_proj"]') == (["lora", "target_modules"], ["q_proj"])
    assert parse_override("model.spec.d_model=64") == (["model", "spec", "d_model"], 64)
    cfg = load_config(
        write(tmp_path, MINIMAL), ["train.max_steps=7", "model.spec.d_model=64", "scheduler.name=linear"]
    )
    assert (
        cfg["train"]["max_steps"] == 7
        and cfg["model"]["spec"]["d_model"] == 64
        and cfg["scheduler"]["name"] == "linear"
    )
    # An empty value removes a key, so the model source can be swapped.
    swapped = load_config(write(tmp_path, MINIMAL), ["model.spec=", "model.path=/m"])
    assert swapped["model"]["path"] == "/m" and swapped["model"]["spec"] is None
    # An override is validated like the file: a typo gets the same did-you-mean.
    assert "did you mean 'max_steps'" in error_of(tmp_path, MINIMAL, ["train.max_stepz=3"])
    with pytest.raises(UserError, match="expected section.key=value"):
        apply_overrides({}, ["max_steps"])


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(write(tmp_path, MINIMAL))
    # Same settings, sections in another order and a default spelled out: same hash.
    reordered = """
[train]
max_steps = 5
[optimizer]
lr = 1e-3
[data]
seq_len = 32
train = ["corpus.txt"]
[model.spec]
n_heads = 4
n_layers = 2
d_model = 32
[run]
name = "t"
"""
    b = load_config(write(tmp_path, reordered, "b.toml"))
    assert a.hash() == b.hash()
    c = load_config(write(tmp_path, MINIMAL), ["optimizer.lr=0.5"])
    assert c.hash() != a.hash()
    # The resolved config written into checkpoints reads back to the same config.
    again = validate(tomllib.loads(to_toml(a.to_dict())))
    assert again.to_dict() == a.to_dict() and again.hash() == a.hash()


@pytest.mark.parametrize("template", [FROM_SCRATCH, LORA])
def test_init_templates_are_valid_configs(template):
    cfg = validate(tomllib.loads(template))
    assert cfg["train"]["max_steps"] > 0
    assert cfg.is_lora == (template is LORA)


HOOKS = """
[[hooks.forward]]
kind = "scale"
point = "layers.*.mlp_out"
factor = 0.5
[[hooks.aux_loss]]
kind = "activation_l2"
point = "layers.0.mlp_out"
weight = 1e-3
[[hooks.update]]
kind = "freeze"
pattern = "model.layers.0.*"
"""


def test_hooks_default_empty_and_are_stored_as_given(tmp_path):
    assert load_config(write(tmp_path, MINIMAL))["hooks"] == {
        "forward": [],
        "backward": [],
        "update": [],
        "aux_loss": [],
    }
    cfg = load_config(write(tmp_path, MINIMAL + HOOKS))
    assert cfg["hooks"]["forward"] == [{"kind": "scale", "point": "layers.*.mlp_out", "factor": 0.5}]
    assert cfg["hooks"]["aux_loss"] == [
        {"kind": "activation_l2", "point": "layers.0.mlp_out", "weight": 1e-3}
    ]
    assert cfg["hooks"]["update"] == [{"kind": "freeze", "pattern": "model.layers.0.*"}]
    assert cfg["hooks"]["backward"] == []


def test_hook_defaults_are_filled_in(tmp_path):
    # Not HOOKS: these hooks leave out their optional keys, so that the defaults show.
    text = (
        MINIMAL
        + """
[[hooks.forward]]
kind = "noise"
point = "embed"
std = 0.1
[[hooks.update]]
kind = "sign"
[[hooks.aux_loss]]
kind = "attention_entropy"
weight = 0.01
[[hooks.aux_loss]]
kind = "z_loss"
weight = 1e-4
"""
    )
    hooks = load_config(write(tmp_path, text))["hooks"]
    assert hooks["forward"] == [{"kind": "noise", "point": "embed", "std": 0.1, "seed": 0}]
    assert hooks["update"] == [{"kind": "sign", "pattern": "*"}]
    assert hooks["aux_loss"] == [
        {"kind": "attention_entropy", "point": "layers.*.attn_probs", "weight": 0.01},
        {"kind": "z_loss", "weight": 1e-4},
    ]
    # Spelling out a default is the same config.
    explicit = text.replace('kind = "sign"', 'kind = "sign"\npattern = "*"')
    assert (
        load_config(write(tmp_path, explicit, "e.toml")).hash() == load_config(write(tmp_path, text)).hash()
    )


def test_hooks_count_in_the_hash_and_round_trip(tmp_path):
    plain = load_config(write(tmp_path, MINIMAL))
    hooked = load_config(write(tmp_path, MINIMAL + HOOKS, "h.toml"))
    assert hooked.hash() != plain.hash()
    other = load_config(write(tmp_path, MINIMAL + HOOKS.replace("0.5", "0.25"), "o.toml"))
    assert other.hash() != hooked.hash()
    assert diff_configs(hooked.to_dict(), other.to_dict()) == [("hooks.forward[0].factor", 0.5, 0.25)]
    again = validate(tomllib.loads(to_toml(hooked.to_dict())))
    assert again.to_dict() == hooked.to_dict() and again.hash() == hooked.hash()


# Malformed [hooks] tables, then bad kinds and parameters: each error names the entry and the key.
HOOK_ERRORS = [
    ("[[hooks.forwrd]]\nkind = 'x'\n", "unknown key 'hooks.forwrd' (did you mean 'forward'?)"),
    ("[hooks.forward]\nkind = 'x'\n", "hooks.forward must be an array of tables ([[hooks.forward]]"),
    ("[hooks]\nbackward = [1]\n", "hooks.backward[0] must be a table"),
    ("[[hooks.update]]\nparams = ['a']\n", 'hooks.update[0] needs kind = "..." (one of "clip_value",'),
    ("[[hooks.update]]\nkind = 3\n", "hooks.update[0].kind must be one of"),
    ("[[hooks.aux_loss]]\nkind = 'activation_l2'\nweight = 1\n", 'hooks.aux_loss[0] needs point = "..."'),
    ("[[hooks.forward]]\nkind = 'scale'\nfactor = 2\n", 'hooks.forward[0] needs point = "..."'),
    ("[[hooks.forward]]\nkind = 'scale'\npoint = 'p'\nat = 1979-05-27\n", "unknown key 'hooks.forward[0].at"),
    (
        "[[hooks.forward]]\nkind = 'scale'\npoint = 'p'\nfactor = 1979-05-27\n",
        "hooks.forward[0].factor must be a number, got datetime.date(1979, 5, 27)",
    ),
    (
        "[[hooks.forward]]\nkind = 'scale'\npoint = 'p'\nfactor = nan\n",
        "hooks.forward[0].factor must be a finite",
    ),
    ("[hook]\n", "unknown section [hook] (did you mean 'hooks'?)"),
    (
        "[[hooks.forward]]\nkind = 'scal'\npoint = 'embed'\n",
        'hooks.forward[0].kind must be one of "scale", "noise", "clamp", '
        "\"ablate_heads\", got 'scal' (did you mean 'scale'?)",
    ),
    ("[[hooks.backward]]\nkind = 'clip'\npoint = 'embed'\n", "hooks.backward[0].kind must be one of"),
    ("[[hooks.update]]\nkind = 'frezee'\n", "hooks.update[0].kind must be one of"),
    ("[[hooks.update]]\nkind = 'frezee'\n", "(did you mean 'freeze'?)"),
    ("[[hooks.aux_loss]]\nkind = 'zloss'\nweight = 1\n", "(did you mean 'z_loss'?)"),
    ("[[hooks.forward]]\nkind = 'python'\npoint = 'embed'\n", 'hooks.forward[0].kind = "python" is only'),
    ("[[hooks.update]]\nkind = 'python'\n", "only available from Python (it runs a Python function"),
    ("[[hooks.forward]]\nkind = 'patch'\npoint = 'embed'\n", "needs the activation array"),
    (
        "[[hooks.forward]]\nkind = 'scale'\npoint = 'embed'\n",
        "missing required key 'hooks.forward[0].factor'",
    ),
    (
        "[[hooks.forward]]\nkind = 'scale'\npoint = 'embed'\nfactr = 2\n",
        "unknown key 'hooks.forward[0].factr' (did you mean 'factor'?)",
    ),
    ("[[hooks.update]]\nkind = 'freeze'\nparams = ['a']\n", "unknown key 'hooks.update[0].params'"),
    ("[[hooks.update]]\nkind = 'freeze'\npoint = 'embed'\n", "unknown key 'hooks.update[0].point'"),
    ("[[hooks.aux_loss]]\nkind = 'z_loss'\nweight = 1\npoint = 'logits'\n", "z_loss takes no point"),
    ("[[hooks.aux_loss]]\nkind = 'z_loss'\n", "missing required key 'hooks.aux_loss[0].weight'"),
    ("[[hooks.forward]]\nkind = 'noise'\npoint = 'embed'\nstd = -1\n", "hooks.forward[0].std must be a"),
    ("[[hooks.forward]]\nkind = 'noise'\npoint = 'e'\nstd = 1\nseed = 1.5\n", ".seed must be an integer"),
    ("[[hooks.backward]]\nkind = 'clip_norm'\npoint = 'embed'\nmax = 0\n", ".max must be a number > 0"),
    ("[[hooks.forward]]\nkind = 'clamp'\npoint = 'embed'\n", "clamp needs min, max or both"),
    (
        "[[hooks.forward]]\nkind = 'ablate_heads'\npoint = 'e'\nheads = [-1]\n",
        ".heads must be a non-empty",
    ),
    # Nothing in a training run reads captured values: a config capture would only hold memory.
    (
        "[[hooks.forward]]\nkind = 'capture'\npoint = 'embed'\n",
        'hooks.forward[0].kind = "capture" is only available from Python (a training run never reads '
        "what it captures; use model.capture(...) from Python)",
    ),
    (
        "[[hooks.forward]]\nkind = 'ablate_heads'\npoint = 'e'\nheads = [0, 1.5]\n",
        ".heads must be a non-empty list of integers >= 0",
    ),
]


@pytest.mark.parametrize("text, needle", HOOK_ERRORS)
def test_hook_errors_name_the_entry_and_key(tmp_path, text, needle):
    assert needle in error_of(tmp_path, MINIMAL + text)


# Optimizers: the keys left out take the defaults of the algorithm `name` picks.


def optimizer_of(tmp_path, section: str, name="o.toml"):
    cfg = load_config(write(tmp_path, MINIMAL + "[optimizer]\n" + section, name))
    return cfg, make_optimizer(cfg)


@pytest.mark.parametrize("name, cls", [("adamw", mc.AdamW), ("sgd", mc.SGD), ("lion", mc.Lion)])
def test_config_optimizer_defaults_are_the_classes_defaults(tmp_path, name, cls):
    cfg, opt = optimizer_of(tmp_path, f'name = "{name}"\n')
    assert opt.config == cls().config
    # The resolved config spells them out, so writing them in is the same config.
    again = validate(tomllib.loads(to_toml(cfg.to_dict())))
    assert again.hash() == cfg.hash()


def test_config_lion_is_mc_lion(tmp_path):
    cfg, _ = optimizer_of(tmp_path, 'name = "lion"\n')
    assert cfg["optimizer"]["lr"] == 1e-4 and cfg["optimizer"]["betas"] == [0.9, 0.99]
    assert cfg["optimizer"]["weight_decay"] == 0.0
    # A key given is kept, the others still come from Lion.
    cfg, opt = optimizer_of(tmp_path, 'name = "lion"\nlr = 3e-4\n', "l.toml")
    assert opt.config == mc.Lion(lr=3e-4).config


def test_config_adamw_defaults_are_unchanged(tmp_path):
    # Configs written before the per-algorithm defaults resolve (and hash) as they did.
    assert load_config(write(tmp_path, MINIMAL))["optimizer"] == {
        "name": "adamw",
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "momentum": 0.0,
        "nesterov": False,
    }


def test_nesterov_without_momentum_is_refused_naming_the_file(tmp_path):
    msg = error_of(tmp_path, MINIMAL + '[optimizer]\nname = "sgd"\nnesterov = true\n')
    assert msg.startswith(f"{tmp_path / 'cfg.toml'}: ")
    assert "optimizer.nesterov = true needs optimizer.momentum > 0" in msg
    _, opt = optimizer_of(tmp_path, 'name = "sgd"\nnesterov = true\nmomentum = 0.9\n')
    assert opt.config == mc.SGD(momentum=0.9, nesterov=True).config


def test_hook_parameters_cannot_override_the_kind_or_where(tmp_path):
    model = mc.Model.from_config(scratch_model_config(load_config(write(tmp_path, MINIMAL)), 64), seed=0)
    with pytest.raises(ValueError, match=r"^forward hook: kind= is not a parameter \(the point and the kind"):
        model.add_forward_hook("embed", "scale", factor=2.0, kind="noise")
    with pytest.raises(ValueError, match=r"^backward hook: pattern= is not a parameter"):
        model.add_backward_hook("embed", "scale", factor=2.0, pattern="*")
    with pytest.raises(ValueError, match=r"^update hook: kind=, point= are not parameters"):
        model.add_update_hook("*", "sign", kind="freeze", point="embed")
    # Nothing was attached: a forward is the plain model's.
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    plain = mc.Model.from_config(scratch_model_config(load_config(write(tmp_path, MINIMAL)), 64), seed=0)
    np.testing.assert_array_equal(model(ids), plain(ids))

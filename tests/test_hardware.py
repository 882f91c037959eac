"""[hardware]: device, dtype, threads, gradient checkpointing and the fused path, kept apart from the
model. Changing it never changes the config's hash, the old keys still work, and the same run
trains (and resumes) under any of its settings."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tomllib

import metalcandle as mc
from conftest import MINIMAL_CONFIG, read_metrics, run_cli, split_metrics, write_config, write_corpus
from metalcandle import _core
from metalcandle import checkpoint as ck
from metalcandle import train as T
from metalcandle.config import SCHEMA, load_config, to_toml, validate
from metalcandle.errors import UserError

MINIMAL = MINIMAL_CONFIG

# Every [hardware] key away from its default (dtype aside: it has its own tests below).
ALL_CHANGED = '[hardware]\ndevice = "cpu"\nthreads = 1\ngradient_checkpointing = true\nfused = false\n'


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(UserError) as e:
        load_config(write(tmp_path, text), list(overrides))
    return str(e.value)


def run(cfg, **kw):
    return T.train(cfg, progress=False, log=lambda m: None, **kw)


# --- the schema and the hash ------------------------------------------------------------------------


def test_hardware_defaults_and_the_old_keys_resolve_into_it(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg["hardware"] == {
        "device": "auto",
        "dtype": "float32",
        "threads": 0,
        "gradient_checkpointing": False,
        "fused": True,
    }
    old = MINIMAL.replace('name = "t"', 'name = "t"\ndevice = "cpu"').replace(
        "max_steps = 5", "max_steps = 5\ngradient_checkpointing = true"
    )
    aliased = load_config(write(tmp_path, old, "old.toml"))
    assert aliased["hardware"]["device"] == "cpu" and aliased["hardware"]["gradient_checkpointing"]
    # The old keys resolve to [hardware] alone, so the checkpoint's config holds each setting once.
    assert "device" not in aliased["run"] and "gradient_checkpointing" not in aliased["train"]
    assert "[hardware]" in to_toml(aliased.to_dict())
    # Giving both is fine while they agree.
    both = old + '[hardware]\ndevice = "cpu"\n'
    assert load_config(write(tmp_path, both, "both.toml"))["hardware"] == aliased["hardware"]


def test_hardware_never_changes_the_hash_and_the_model_does(tmp_path):
    plain = load_config(write(tmp_path, MINIMAL))
    changed = load_config(write(tmp_path, MINIMAL + ALL_CHANGED, "hw.toml"))
    assert changed["hardware"] != plain["hardware"] and changed.hash() == plain.hash()
    half = load_config(write(tmp_path, MINIMAL + '[hardware]\ndtype = "bfloat16"\n', "bf16.toml"))
    assert half.hash() == plain.hash()
    old_names = load_config(write(tmp_path, MINIMAL), ["run.device=cpu", "train.gradient_checkpointing=true"])
    assert old_names.hash() == plain.hash()
    for model_change in ("model.spec.d_model=64", "model.spec.n_layers=3", "model.spec.norm=rmsnorm"):
        assert load_config(write(tmp_path, MINIMAL), [model_change]).hash() != plain.hash(), model_change
    # The resolved config written into checkpoints reads back to the same config and hash.
    again = validate(tomllib.loads(to_toml(changed.to_dict())))
    assert again.to_dict() == changed.to_dict() and again.hash() == changed.hash()


@pytest.mark.parametrize(
    "section, needle",
    [
        ('device = "gpu"', 'hardware.device must be one of "auto", "cpu", "cuda", "metal", got \'gpu\''),
        ('dtype = "fp16"', 'hardware.dtype must be one of "float32", "bfloat16", "float16", got \'fp16\''),
        ("threads = -1", "hardware.threads must be an integer >= 0, got -1"),
        ("threads = 1.5", "hardware.threads must be an integer, got 1.5"),
        ('gradient_checkpointing = "yes"', "hardware.gradient_checkpointing must be true or false"),
        ("fused = 1", "hardware.fused must be true or false, got 1"),
        ("thread = 2", "unknown key 'hardware.thread' (did you mean 'threads'?)"),
    ],
)
def test_bad_hardware_values_name_the_key(tmp_path, section, needle):
    msg = error_of(tmp_path, MINIMAL + "[hardware]\n" + section + "\n")
    assert msg.startswith(f"{tmp_path / 'cfg.toml'}: ") and needle in msg and "\n" not in msg


def test_old_and_new_keys_that_disagree_are_refused_naming_both(tmp_path):
    text = MINIMAL.replace('name = "t"', 'name = "t"\ndevice = "cpu"') + '[hardware]\ndevice = "cuda"\n'
    msg = error_of(tmp_path, text)
    assert 'run.device = "cpu" and hardware.device = "cuda" disagree; keep hardware.device' in msg
    msg = error_of(tmp_path, MINIMAL + ALL_CHANGED, ["train.gradient_checkpointing=false"])
    assert "train.gradient_checkpointing = false and hardware.gradient_checkpointing = true" in msg
    # An old key's bad value is named as written.
    assert "run.device must be one of" in error_of(tmp_path, MINIMAL, ["run.device=gpu"])
    assert "[hardware] must be a table" in error_of(tmp_path, "hardware = 3\n" + MINIMAL)


def test_half_precision_lora_is_refused_before_any_work(tmp_path):
    text = '[run]\nname = "l"\n[model]\npath = "m"\n[data]\ntrain = ["c.txt"]\n[train]\nmax_steps = 1\n'
    text += '[lora]\nr = 4\n[hardware]\ndtype = "bfloat16"\n'
    assert 'hardware.dtype = "bfloat16" with [lora]: a LoRA adapter trains on a float32 base' in error_of(
        tmp_path, text
    )


def test_the_command_line_exits_naming_the_hardware_key(capsys, tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path / "c.toml", "c", tmp_path / "runs/c", tmp_path / "models", steps=2)
    code, _, err = run_cli(capsys, "train", cfg, "--quiet", "--set", "hardware.threads=-2")
    assert code == 2 and "hardware.threads must be an integer >= 0, got -2" in err


def test_ranks_may_differ_in_hardware_but_not_in_dtype(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    other = load_config(write(tmp_path, MINIMAL + ALL_CHANGED, "other.toml"))

    def ranks(*configs):
        return SimpleNamespace(allgather=lambda _: [(c.hash(), c["hardware"]["dtype"]) for c in configs])

    T.check_same_config(cfg, ranks(cfg, other))  # other threads, device, path: the same training
    half = load_config(write(tmp_path, MINIMAL + '[hardware]\ndtype = "float16"\n', "half.toml"))
    with pytest.raises(UserError, match=r"different hardware.dtype \(rank 0: float32, rank 1: float16\)"):
        T.check_same_config(cfg, ranks(cfg, half))


# --- training under [hardware] ------------------------------------------------------------------------


@pytest.fixture
def trainers(monkeypatch):
    """Every Trainer the training loop makes, to read which path its steps took."""
    made = []

    class Recording(mc.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(mc, "Trainer", Recording)
    return made


def scratch(workdir, name, steps=2, overrides=()):
    path = write_config(workdir / f"{name}.toml", name, workdir / "runs" / name, workdir / "models", steps)
    return load_config(path, list(overrides))


@pytest.mark.parametrize(("fused", "path"), [(False, "composed"), (True, "fused")])
def test_hardware_fused_picks_the_training_path(tmp_path, trainers, fused, path):
    write_corpus(tmp_path)
    run(scratch(tmp_path, "p", overrides=[f"hardware.fused={str(fused).lower()}"]))
    assert [t.last_step_path for t in trainers] == [path]


@pytest.mark.parametrize("key", ["hardware.gradient_checkpointing", "train.gradient_checkpointing"])
def test_gradient_checkpointing_reaches_the_trainer(tmp_path, trainers, key):
    write_corpus(tmp_path)
    run(scratch(tmp_path, "g", overrides=[f"{key}=true"]))
    assert [(t.gradient_checkpointing, t.last_step_path) for t in trainers] == [(True, "fused")]


def test_threads_are_set_for_the_core_and_zero_leaves_them(tmp_path, monkeypatch):
    write_corpus(tmp_path)
    monkeypatch.setenv("RAYON_NUM_THREADS", "7")  # what the config's threads must replace
    run(scratch(tmp_path, "d"))
    assert os.environ["RAYON_NUM_THREADS"] == "7"
    run(scratch(tmp_path, "one", overrides=["hardware.threads=1"]))
    assert os.environ["RAYON_NUM_THREADS"] == "1" and _core.build_info()["threads"] == 1


def test_import_pins_the_default_thread_count_and_keeps_the_users(tmp_path):
    # Pinned, the matrix products stop re-reading /proc/cpuinfo; the count itself must not change,
    # and a count the user set before import is theirs.
    probe = (
        "import os, metalcandle as mc; "
        "print(os.environ['RAYON_NUM_THREADS'], mc._core.build_info()['threads'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    pinned, used = out.stdout.split()
    assert pinned == used == str(_core.default_threads())
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={**env, "RAYON_NUM_THREADS": "3"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["3", "3"]


def train_in_a_fresh_process(folder, cfg_file, *overrides):
    """`metalcandle train` in its own process, so the core's thread pool is built under the
    config's threads; RAYON_NUM_THREADS is unset, so the default is the library's own."""
    env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "metalcandle", "train", str(cfg_file), "--quiet", *sets]
    p = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return split_metrics(folder / "runs" / "same")[0]


def test_one_thread_trains_the_default_threads_run_bit_for_bit(tmp_path):
    # The core's kernels split work over rows and add partial sums in a fixed order, so the thread
    # count changes no bit (the fixed block sums are there for that): equality, not a tolerance.
    cfg_file = write_config(tmp_path / "c.toml", "same", "runs/same", "models", steps=6)
    write_corpus(tmp_path)
    runs = {}
    for threads in ("0", "1"):
        (tmp_path / threads).mkdir()  # a working folder each: the same relative output_dir, same hash
        runs[threads] = train_in_a_fresh_process(tmp_path / threads, cfg_file, f"hardware.threads={threads}")
    default, one = runs["0"], runs["1"]
    assert [r["step"] for r in one] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in one] == [(r["loss"], r["grad_norm"]) for r in default]
    assert {r["config_hash"] for r in one + default} == {load_config(cfg_file).hash()}


def test_half_precision_from_scratch_trains_and_resumes(tmp_path, trainers):
    write_corpus(tmp_path)
    half = ["hardware.dtype=bfloat16"]
    cfg = scratch(tmp_path, "h", steps=3, overrides=half)
    run(cfg, stop_at_step=2)
    assert trainers[-1].last_step_path == "composed" and "BF16" in trainers[-1].last_composed_reason
    result = run(cfg)
    assert result.steps == 3 and all(r["loss"] > 0 for r in split_metrics(cfg.output_dir)[0])


# --- resume under other hardware ----------------------------------------------------------------------


def test_a_run_resumes_under_other_hardware_with_its_hash(capsys, tmp_path):
    write_corpus(tmp_path)
    cfg_file = write_config(tmp_path / "r.toml", "r", tmp_path / "runs/r", tmp_path / "models", steps=6)
    cfg = load_config(cfg_file)
    run(cfg, stop_at_step=3)
    sets = ["hardware.device=cpu", "hardware.threads=1", "hardware.fused=false"]
    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet", *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    changed = {"hardware.device", "hardware.threads", "hardware.fused"}
    noted = [ln for ln in err.splitlines() if ln.startswith("note: resuming with changed ")]
    assert len(noted) == 1 and set(noted[0].split("changed ", 1)[1].split(", ")) == changed
    runinfo = json.loads((cfg.output_dir / "run.json").read_text())
    assert set(runinfo["resumes"][0]["changed"]) == changed
    rows = read_metrics(cfg.output_dir)
    assert max(r["step"] for r in rows) == 6 and {r["config_hash"] for r in rows} == {cfg.hash()}


def test_a_resume_in_another_dtype_is_refused_naming_it(capsys, tmp_path):
    write_corpus(tmp_path)
    cfg_file = write_config(tmp_path / "d.toml", "d", tmp_path / "runs/d", tmp_path / "models", steps=6)
    run(load_config(cfg_file), stop_at_step=3)
    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet", "--set", "hardware.dtype=bfloat16")
    assert code == 2 and err.count("\n") == 1
    assert 'trained with hardware.dtype = "float32"' in err and 'set hardware.dtype = "float32"' in err
    assert max(r["step"] for r in read_metrics(tmp_path / "runs/d")) == 3  # nothing was touched


def test_a_checkpoint_from_before_hardware_resumes_as_is(capsys, tmp_path):
    write_corpus(tmp_path)
    cfg_file = write_config(tmp_path / "o.toml", "o", tmp_path / "runs/o", tmp_path / "models", steps=6)
    cfg = load_config(cfg_file)
    run(cfg, stop_at_step=3)
    # Rewrite the checkpoint as an older version saved it: the settings in [run] and [train], no
    # [hardware], and a hash over all of it.
    last = ck.latest_checkpoint(cfg.output_dir / "checkpoints")
    saved = json.loads((last / ck.RUN_CONFIG_JSON).read_text())["config"]
    hardware = saved.pop("hardware")
    saved["run"]["device"] = hardware["device"]
    saved["train"]["gradient_checkpointing"] = hardware["gradient_checkpointing"]
    ck.write_json(last / ck.RUN_CONFIG_JSON, {"config": saved, "hash": "0123456789abcdef"})
    state = json.loads((last / ck.STATE_FILE).read_text())
    ck.write_json(last / ck.STATE_FILE, {**state, "config_hash": "0123456789abcdef"})
    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet")
    assert code == 0, err
    assert "resuming with changed" not in err and "--allow-config-change" not in err
    resumed = json.loads((cfg.output_dir / "run.json").read_text())["resumes"][0]
    assert resumed["changed"] == [] and resumed["config_hash_before"] == "0123456789abcdef"


def test_every_hardware_key_is_free_on_resume_but_dtype():
    from metalcandle.runs import FREE_ON_RESUME

    keys = {f"hardware.{k}" for k in SCHEMA["hardware"]}
    assert keys - set(FREE_ON_RESUME) == {"hardware.dtype"}

"""The training loop end to end on tiny models: schedule, metrics, checkpoints, exact resume,
gradient accumulation, early stopping, LoRA fine-tuning and registration."""

import json
import math
import signal

import numpy as np
import pytest

import metalcandle as mc
from conftest import SCRATCH_TOML, split_metrics, write_config, write_corpus
from metalcandle import checkpoint as ck
from metalcandle import train as T
from metalcandle.cli import main
from metalcandle.config import load_config
from metalcandle.errors import TrainingInterrupted, UserError
from metalcandle.loading import load_folder_tokenizer, load_model_dir
from metalcandle.registry import Registry
from metalcandle.schedule import lr_at
from metalcandle.tokenizers import CharTokenizer

CORPUS_CHARS = 12_000
DROPOUT = ["model.spec.dropout=0.1"]  # so an exact resume must also continue the dropout masks


@pytest.fixture
def workdir(tmp_path):
    return write_corpus(tmp_path, CORPUS_CHARS)


def make_cfg(workdir, name="tiny", steps=12, overrides=(), template=SCRATCH_TOML):
    p = write_config(
        workdir / f"{name}.toml", name, workdir / "runs" / name, workdir / "models", steps, template
    )
    return load_config(p, list(overrides))


def run(cfg, **kw):
    return T.train(cfg, progress=False, log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """12 steps with dropout in one go: what every interrupted-and-resumed run must reproduce."""
    workdir = write_corpus(tmp_path_factory.mktemp("uninterrupted"), CORPUS_CHARS)
    cfg = make_cfg(workdir, "full", steps=12, overrides=DROPOUT)
    run(cfg)
    rows, _ = split_metrics(cfg.output_dir)
    return rows, mc.load_model(cfg.output_dir / "checkpoints" / ck.step_dir_name(12))


def assert_same_run(uninterrupted, out):
    """Same losses and final weights, bit for bit, as the uninterrupted run."""
    want_rows, want_model = uninterrupted
    rows, _ = split_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # no duplicated lines from the first attempt
    assert [r["loss"] for r in rows] == [r["loss"] for r in want_rows]
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in want_rows]
    model = mc.load_model(out / "checkpoints" / ck.step_dir_name(12))
    for name in want_model.parameter_names():
        np.testing.assert_array_equal(model.get_parameter(name), want_model.get_parameter(name), err_msg=name)


# --- schedule -------------------------------------------------------------------------------------


def test_schedules_match_closed_forms():
    lr, warm, total, floor = 1.0, 10, 110, 0.1
    assert lr_at(1, lr, "cosine", warm, total, floor) == pytest.approx(0.1)
    assert lr_at(10, lr, "cosine", warm, total, floor) == pytest.approx(1.0)
    assert lr_at(60, lr, "cosine", warm, total, floor) == pytest.approx(floor + (1 - floor) * 0.5)  # halfway
    assert lr_at(110, lr, "cosine", warm, total, floor) == pytest.approx(floor)
    assert lr_at(35, lr, "cosine", warm, total, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_at(60, lr, "linear", warm, total, floor) == pytest.approx(0.55)
    assert lr_at(110, lr, "linear", warm, total, 0.0) == pytest.approx(0.0)
    assert lr_at(500, lr, "constant", warm, total, floor) == 1.0
    assert lr_at(5, 2.0, "constant", 0, total, floor) == 2.0


# --- a full run -----------------------------------------------------------------------------------


def test_run_writes_metrics_checkpoints_plot_and_registers(workdir):
    cfg = make_cfg(workdir, steps=30, overrides=["train.eval_every=10", "train.save_every=10"])
    result = run(cfg)
    out = cfg.output_dir
    train_rows, eval_rows = split_metrics(out)
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in train_rows)
    assert [r["step"] for r in eval_rows] == [10, 20, 30]
    for r in eval_rows:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    # The learning rate in the log is the schedule's.
    for r in train_rows:
        assert r["lr"] == pytest.approx(lr_at(r["step"], 3e-3, "cosine", 3, 30, 0.1))
    # It learns: the loss falls well below uniform over the 99-character vocabulary.
    assert train_rows[0]["loss"] == pytest.approx(math.log(99), abs=0.3)
    assert np.mean([r["loss"] for r in train_rows[-5:]]) < train_rows[0]["loss"] - 1.0
    assert eval_rows[-1]["val_loss"] < eval_rows[0]["val_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # keep_last = 2: only the newest two step checkpoints remain, and no temp folders.
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [20, 30]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    final = result.final_dir
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == 30 and state["data_position"] == 30 * 4 and state["config_hash"] == cfg.hash()
    meta = json.loads((final / "metadata.json").read_text())
    assert {"model_name", "model_id", "model_source", "fine_tuned_from"} <= set(meta)
    assert meta["model_name"] == "tiny" and meta["fine_tuned_from"] is None
    assert json.loads((final / "run_config.json").read_text())["hash"] == cfg.hash()
    assert load_config(final / "run_config.toml").hash() == cfg.hash()
    # The checkpoint is a loadable model folder with its tokenizer, and the registry has a copy.
    entry = Registry(workdir / "models").get("tiny")
    assert entry["architecture_type"] == "custom-transformer" and entry["model_id"] == meta["model_id"]
    ids = np.array([load_folder_tokenizer(final).encode("The quick brown fox")], dtype=np.int64)
    np.testing.assert_array_equal(
        mc.load_model(final).forward(ids), mc.load_model(entry["path"]).forward(ids)
    )
    # `eval` on the final checkpoint reproduces the last evaluation of the run.
    r = T.evaluate_checkpoint(cfg, final)
    assert r["val_loss"] == pytest.approx(eval_rows[-1]["val_loss"], rel=1e-6)


def test_resume_is_exact(workdir, uninterrupted):
    part = make_cfg(workdir, "part", steps=12, overrides=DROPOUT)
    r1 = run(part, stop_at_step=7)  # as if interrupted right after the step-7 checkpoint
    assert r1.steps == 7 and r1.registered_as is None
    assert [s for s, _ in ck.list_checkpoints(part.output_dir / "checkpoints")] == [5, 7]
    r2 = run(part)  # resume = "auto" picks step 7
    assert r2.steps == 12
    # Resuming with a setting that defines the run changed is refused; a longer run is fine.
    with pytest.raises(
        UserError, match=r"different model.spec.dropout, optimizer.lr; use another run.output_dir"
    ):
        run(make_cfg(workdir, "part", steps=12, overrides=["model.spec.dropout=0.0", "optimizer.lr=1e-3"]))
    assert_same_run(uninterrupted, part.output_dir)


def interrupt_at(monkeypatch, when, k):
    """Ctrl-C around step k. "during-step": the signal comes while the core updates the weights of
    step k, so Python raises it only once the core returns (as a real Ctrl-C would). "between-steps":
    a KeyboardInterrupt from the schedule lookup of step k + 1, before any of its work."""
    if when == "during-step":
        real_step = mc.Trainer.step

        def step(self, *args, **kwargs):
            stats = real_step(self, *args, **kwargs)
            if self.step_count == k:
                signal.raise_signal(signal.SIGINT)
            return stats

        monkeypatch.setattr(mc.Trainer, "step", step)
    else:

        def lr(step, *args):
            if step == k + 1:
                raise KeyboardInterrupt
            return lr_at(step, *args)

        monkeypatch.setattr(T, "lr_at", lr)


@pytest.mark.parametrize("when", ["during-step", "between-steps"])
def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(workdir, uninterrupted, monkeypatch, capsys, when):
    part = make_cfg(workdir, "part", steps=12, overrides=DROPOUT)
    argv = ["train", str(workdir / "part.toml"), "--quiet", "--set", DROPOUT[0]]
    interrupt_at(monkeypatch, when, 7)  # 7: not a save_every step, so only the interrupt saves it
    assert main(argv) == 130
    err = capsys.readouterr().err
    ckpt = part.output_dir / "checkpoints" / ck.step_dir_name(7)
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"interrupted at step 7: checkpoint saved in {ckpt}; run the same command again to resume"
    )
    assert [s for s, _ in ck.list_checkpoints(part.output_dir / "checkpoints")] == [5, 7]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 7 and state["data_position"] == 7 * 4

    monkeypatch.undo()
    assert main(argv) == 0
    assert_same_run(uninterrupted, part.output_dir)


def test_ctrl_c_before_any_step_and_from_python(workdir, monkeypatch):
    cfg = make_cfg(workdir, "early", steps=12, overrides=["train.resume=false"])
    interrupt_at(monkeypatch, "between-steps", 0)
    with pytest.raises(TrainingInterrupted, match="before the first step finished; nothing to save"):
        run(cfg)
    assert ck.list_checkpoints(cfg.output_dir / "checkpoints") == []
    # With resume = false, running the same command again would start over, so the line says how
    # to resume from the saved checkpoint instead.
    monkeypatch.undo()
    interrupt_at(monkeypatch, "during-step", 3)
    with pytest.raises(KeyboardInterrupt) as e:
        run(cfg)
    ckpt = cfg.output_dir / "checkpoints" / ck.step_dir_name(3)
    assert isinstance(e.value, TrainingInterrupted) and e.value.checkpoint == ckpt and e.value.step == 3
    assert str(e.value).endswith(f"to resume, run it again with --set train.resume={ckpt}")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3


def test_bpe_tokenizer_is_trained_and_saved(workdir):
    cfg = make_cfg(workdir, "bpe", steps=3, overrides=["tokenizer.kind=bpe", "tokenizer.vocab_size=300"])
    result = run(cfg)
    tok = load_folder_tokenizer(result.final_dir)
    model = mc.load_model(result.final_dir)
    assert tok.vocab_size == 300 == model.vocab_size
    # Byte-level BPE round-trips any text, and merges make it shorter than its bytes.
    text = (workdir / "corpus.txt").read_text()[:500]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())


def test_grad_accumulation_equals_the_larger_batch(workdir):
    # Two micro-batches of 4 consume the same windows, in the same order, as one batch of 8.
    big = make_cfg(workdir, "big", steps=4, overrides=["train.batch_size=8"])
    acc = make_cfg(workdir, "acc", steps=4, overrides=["train.batch_size=4", "train.grad_accum=2"])
    run(big)
    run(acc)
    a, _ = split_metrics(big.output_dir)
    b, _ = split_metrics(acc.output_dir)
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-5)


def test_early_stopping_keeps_the_best_checkpoint(workdir):
    # Validation text is uniform noise over the character alphabet: the untrained model is at its
    # best there (close to uniform), and every step towards English makes validation worse. So
    # the first evaluation is the best one and the run stops `patience` evaluations later.
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!?;:#@{}[]<>"))
    (workdir / "noise.txt").write_text("".join(rng.choice(alphabet, size=4000)))
    cfg = make_cfg(
        workdir,
        "es",
        steps=50,
        overrides=[
            'data.valid=["noise.txt"]',
            "train.eval_every=2",
            "train.save_every=100",
            "train.early_stopping_patience=2",
        ],
    )
    result = run(cfg)
    _, evals = split_metrics(cfg.output_dir)
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert evals[0]["val_loss"] < evals[1]["val_loss"] < evals[2]["val_loss"]
    assert result.stopped_early and result.steps == 6
    assert result.final_dir == cfg.output_dir / "best"
    best = json.loads((cfg.output_dir / "best" / "state.json").read_text())
    assert best["step"] == 2 and best["best_val_loss"] == evals[0]["val_loss"]
    # The registered model is the best one, not the last.
    entry = Registry(workdir / "models").get("es")
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    best_logits = mc.load_model(cfg.output_dir / "best").forward(ids)
    np.testing.assert_array_equal(mc.load_model(entry["path"]).forward(ids), best_logits)
    last = ck.list_checkpoints(cfg.output_dir / "checkpoints")[-1]
    assert last[0] == 6 and not np.array_equal(mc.load_model(last[1]).forward(ids), best_logits)
    # Resuming a run that stopped early does not train further.
    again = run(cfg)
    assert again.steps == 6 and again.stopped_early


def test_epochs_set_the_number_of_steps(workdir):
    text = SCRATCH_TOML.replace("max_steps = {steps}", "epochs = 0.1")
    cfg = make_cfg(workdir, "ep", template=text)
    n_train = len(T.load_datasets(cfg, CharTokenizer()).train)
    result = run(cfg)
    assert result.steps == math.ceil(0.1 * n_train / 4)
    assert json.loads((result.final_dir / "state.json").read_text())["data_position"] == result.steps * 4


def test_atomic_checkpoint_write(tmp_path):
    dest = tmp_path / "ckpt"

    def good(d):
        (d / "a.txt").write_text("old")

    ck.write_atomic_dir(dest, good)

    def crash(d):
        (d / "a.txt").write_text("new, half written")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ck.write_atomic_dir(dest, crash)
    # The previous checkpoint is untouched and nothing half-written is left around.
    assert (dest / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# --- LoRA fine-tuning of a pretrained model -------------------------------------------------------

LORA = """
[run]
name = "{name}"
output_dir = "{out}"
models_dir = "{models}"
seed = 0

[model]
name = "tiny-qwen2"

[data]
train = ["chat.jsonl"]
valid_fraction = 0.2
seq_len = 64
packing = false

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[optimizer]
lr = 1e-2
weight_decay = 0.0

[scheduler]
name = "constant"

[train]
max_steps = {steps}
batch_size = 4
eval_every = 4
eval_batches = 2
save_every = 4
log_every = 1

[generate]
max_new_tokens = 6
temperature = 0
"""


def chat_rows(n=40):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        a, b = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        user = {"role": "user", "content": f"What is {a} plus {b}?"}
        reply = {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}
        rows.append({"messages": [user, reply]})
    return rows


def test_lora_fine_tune_resume_and_lineage(workdir, fixtures):
    (workdir / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    assert main(["import-model", str(fixtures / "tiny-qwen2"), "--models-dir", str(workdir / "models")]) == 0
    full = make_cfg(workdir, "lora-full", steps=8, template=LORA)
    result = run(full)
    part = make_cfg(workdir, "lora-part", steps=8, template=LORA)
    run(part, stop_at_step=4)
    run(part)
    a, _ = split_metrics(full.output_dir)
    b, _ = split_metrics(part.output_dir)
    assert [r["loss"] for r in b] == [r["loss"] for r in a]  # resumed exactly
    assert a[-1]["loss"] < a[0]["loss"]

    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # only the adapter, not a copy of the base
    meta = json.loads((final / "metadata.json").read_text())
    assert meta["fine_tuned_from"] == "tiny-qwen2" and meta["training"] == "lora"
    reg = Registry(workdir / "models")
    assert reg.lineage("lora-full") == ["lora-full", "tiny-qwen2"]
    # The checkpoint loads as base + adapter and differs from the base.
    tok = load_folder_tokenizer(final)
    ids = np.array([tok.encode("What is 2 plus 3?")], dtype=np.int64)
    tuned = load_model_dir(final).forward(ids)
    registered = load_model_dir(reg.get("lora-full")["path"]).forward(ids)
    base = mc.load_model(fixtures / "tiny-qwen2").forward(ids)
    np.testing.assert_array_equal(tuned, registered)
    assert np.abs(tuned - base).max() > 1e-3

"""The `metalcandle` command line: help, one-line errors with exit code 2, and every command."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import metalcandle as mc
from conftest import PRETRAINED_TOML, read_metrics, run_cli, write_config
from metalcandle.cli import main
from metalcandle.registry import Registry
from metalcandle.tokenizers import load_tokenizer

COMMANDS = ["train", "eval", "compare", "import-model", "models", "init", "chat", "generate"]


def module(*argv, env=None, stdin=None):
    """`python -m metalcandle ...` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "metalcandle", *argv],
        capture_output=True,
        text=True,
        input=stdin,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def scratch_cfg(workdir):
    return write_config(workdir / "cfg.toml", "cli-tiny", workdir / "out", workdir / "models", steps=6)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert f"usage: metalcandle {command}" in capsys.readouterr().out


def test_errors_are_one_line_with_exit_code_2(capsys, scratch_cfg, tmp_path):
    code, _, err = run_cli(capsys, "train", str(scratch_cfg), "--set", "train.max_stepz=3")
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert err.startswith("error: ") and str(scratch_cfg) in err
    assert "unknown key 'train.max_stepz' (did you mean 'max_steps'?)" in err

    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.toml"))
    assert code == 2 and err.strip() == f"error: config file not found: {tmp_path / 'missing.toml'}"

    code, _, err = run_cli(capsys, "train")
    assert code == 2 and err.strip().count("\n") == 0 and "required: CFG" in err

    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "invalid choice: 'frobnicate'" in err

    code, _, err = run_cli(capsys, "train", str(scratch_cfg), "--set", "data.seq_len=many")
    assert code == 2 and "data.seq_len must be an integer, got 'many'" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--debug", "train", str(tmp_path / "missing.toml"))
    assert code == 2 and "Traceback" in err and "config file not found" in err


def test_python_dash_m_and_init(tmp_path):
    r = module("init", "--lora")
    assert r.returncode == 0 and "[lora]" in r.stdout and "import-model" in r.stdout
    r = module("init")
    assert r.returncode == 0 and "[model.spec]" in r.stdout
    # The printed config is accepted as is (only its data file is missing).
    (tmp_path / "cfg.toml").write_text(r.stdout)
    r = module("train", str(tmp_path / "cfg.toml"))
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: data file not found: {tmp_path / 'data' / 'corpus.txt'}"
    )


def test_import_model_and_models_listing(capsys, tmp_path, fixtures):
    models = str(tmp_path / "models")
    code, out, _ = run_cli(
        capsys, "import-model", str(fixtures / "tiny-qwen2"), "--name", "qwen-tiny", "--models-dir", models
    )
    assert code == 0 and "qwen-tiny (qwen" in out
    entry = Registry(models).get("qwen-tiny")
    assert entry["source"] == f"local:{fixtures / 'tiny-qwen2'}" and entry["architecture_type"] == "qwen"
    # A full copy that loads to the same logits.
    ids = np.load(fixtures / "tiny-qwen2" / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(
        mc.load_model(entry["path"]).forward(ids), mc.load_model(fixtures / "tiny-qwen2").forward(ids)
    )

    code, _, err = run_cli(
        capsys, "import-model", str(fixtures / "tiny-qwen2"), "--name", "qwen-tiny", "--models-dir", models
    )
    assert code == 2 and "already in the registry" in err
    code, _, err = run_cli(capsys, "import-model", str(tmp_path / "nowhere"), "--models-dir", models)
    assert code == 2 and "model folder not found" in err

    Registry(models).register(
        {"model_name": "qwen-ft", "architecture_type": "qwen", "fine_tuned_from": "qwen-tiny"}
    )
    code, out, _ = run_cli(capsys, "models", "--models-dir", models)
    assert code == 0 and "qwen-ft <- qwen-tiny" in out
    code, out, _ = run_cli(capsys, "models", "show", "qwen-ft", "--models-dir", models)
    assert code == 0 and json.loads(out)["lineage"] == ["qwen-ft", "qwen-tiny"]
    code, _, err = run_cli(capsys, "models", "show", "qwen-fx", "--models-dir", models)
    assert code == 2 and "did you mean 'qwen-ft'" in err


def test_import_model_hub_id_offline(tmp_path):
    r = module(
        "import-model",
        "some-org/some-model-that-is-not-here",
        "--models-dir",
        str(tmp_path),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert (
        "could not fetch 'some-org/some-model-that-is-not-here'" in r.stderr
        and "pass a local model folder" in r.stderr
    )


def greedy_reference(model, ids, n):
    """Greedy decoding by full forward passes (no KV cache), as an independent reference."""
    ids = list(ids)
    for _ in range(n):
        logits = model.forward(np.array([ids], dtype=np.int64))
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_train_eval_and_generate_from_a_checkpoint(capsys, scratch_cfg, tmp_path):
    code, out, _ = run_cli(capsys, "train", str(scratch_cfg), "--quiet")
    assert code == 0 and "steps: 6" in out and "registered as: cli-tiny" in out
    metrics = read_metrics(tmp_path / "out")
    code, out, _ = run_cli(capsys, "eval", str(scratch_cfg))
    assert code == 0
    val = float(out.split("val_loss ")[1].split()[0])
    assert val == pytest.approx([m for m in metrics if "val_loss" in m][-1]["val_loss"], abs=1e-4)

    code, _, err = run_cli(capsys, "chat", str(scratch_cfg))
    assert code == 2 and "no chat template; use `metalcandle generate" in err

    ckpt = tmp_path / "out" / "checkpoints" / "step-00000006"
    greedy = ["--set", "generate.temperature=0", "--set", "generate.max_new_tokens=6"]
    code, out, err = run_cli(capsys, "generate", scratch_cfg, "The ", *greedy)
    assert code == 0 and str(ckpt) in err
    tok = load_tokenizer(ckpt)
    expected = greedy_reference(mc.load_model(ckpt), tok.encode("The "), 6)
    assert out.rstrip("\n") == tok.decode(expected[len(tok.encode("The ")) :])


def test_generate_and_chat_with_base_and_lora_adapter(capsys, tmp_path, fixtures):
    (tmp_path / "corpus.txt").write_text("hello world\n")
    base_dir = fixtures / "tiny-qwen2"
    cfg = write_config(tmp_path / "q.toml", "cli-qwen", tmp_path / "out", tmp_path / "models", steps=2,
                       template=PRETRAINED_TOML, base=base_dir)  # fmt: skip
    adapter = base_dir / "lora" / "adapter_final"
    tok = load_tokenizer(base_dir)
    prompt_ids = tok.encode("Hello")
    model = mc.load_model(base_dir)
    tuned_model = mc.load_model(base_dir)
    tuned_model.load_adapter(adapter)
    want_base = tok.decode(greedy_reference(model, prompt_ids, 5)[len(prompt_ids) :])
    want_tuned = tok.decode(greedy_reference(tuned_model, prompt_ids, 5)[len(prompt_ids) :])
    assert want_base != want_tuned  # so the output shows whether the adapter was applied

    code, out, err = run_cli(capsys, "generate", cfg, "Hello")
    assert code == 0 and out.rstrip("\n") == want_base, err
    code, out, err = run_cli(capsys, "generate", cfg, "Hello", "--adapter", adapter)
    assert code == 0 and out.rstrip("\n") == want_tuned, err
    assert "+ " + str(adapter) in err

    # The reply is greedy generation on the ChatML rendering of the message (default system prompt
    # included) with the adapter applied; the base model would say something else.
    chat = module("chat", str(cfg), "--adapter", str(adapter), stdin="Hi there\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                       tokenize=True)  # fmt: skip
    reply, base_reply = (
        tok.decode(greedy_reference(m, chat_ids, 5)[len(chat_ids) :], skip_special_tokens=True)
        for m in (tuned_model, model)
    )
    assert reply != base_reply
    assert f">>> {reply}\n>>> " in chat.stdout, chat.stdout

    bad = module("chat", str(cfg), "--adapter", str(tmp_path))
    assert bad.returncode == 2 and "not a LoRA adapter folder" in bad.stderr

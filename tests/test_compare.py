"""Honest comparisons: run ids and config hashes on every metrics line and checkpoint, the resume
guard (hooks never free to change), and `metalcandle compare`."""

import json
import re

import pytest

from conftest import read_metrics, run_cli, write_config
from metalcandle import checkpoint as ck
from metalcandle import train as T
from metalcandle.config import load_config

HOOK = 'hooks.forward=[{kind = "scale", point = "layers.*.mlp_out", factor = 0.5}]'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_cfg(workdir, name):
    return write_config(workdir / f"{name}.toml", name, workdir / "runs" / name, workdir / "models", steps=6)


def diff_lines(out: str) -> list[str]:
    return [ln.strip() for ln in out.splitlines() if ln.startswith("  ") and " -> " in ln]


def test_run_id_and_config_hash_on_every_line_and_checkpoint(capsys, workdir):
    cfg_file = write_cfg(workdir, "tiny")
    code, _, _ = run_cli(capsys, "train", cfg_file, "--quiet")
    assert code == 0
    cfg = load_config(cfg_file)
    out = cfg.output_dir
    run = json.loads((out / "run.json").read_text())
    assert re.fullmatch(r"tiny-\d{8}T\d{6}Z-[0-9a-f]{6}", run["run_id"])
    assert run["config_hash"] == cfg.hash() and run["config"] == cfg.to_dict()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", run["created_at"]) and run["resumes"] == []
    rows = read_metrics(out)
    assert rows and all(r["run_id"] == run["run_id"] and r["config_hash"] == cfg.hash() for r in rows)
    checkpoints = ck.list_checkpoints(out / "checkpoints")
    assert [step for step, _ in checkpoints] == [5, 6]
    for _, folder in checkpoints:
        meta = json.loads((folder / "metadata.json").read_text())
        state = json.loads((folder / "state.json").read_text())
        assert meta["run_id"] == state["run_id"] == run["run_id"]
        assert meta["config_hash"] == state["config_hash"] == cfg.hash()
    # A fresh run in the same folder is another run.
    assert run_cli(capsys, "train", cfg_file, "--quiet", "--set", "train.resume=false")[0] == 0
    again = json.loads((out / "run.json").read_text())["run_id"]
    assert again != run["run_id"] and {r["run_id"] for r in read_metrics(out)} == {again}


def test_compare_prints_exactly_the_differing_key_and_plots_both(capsys, workdir, tmp_path):
    a_cfg, b_cfg = write_cfg(workdir, "a"), write_cfg(workdir, "b")
    assert run_cli(capsys, "train", a_cfg, "--quiet")[0] == 0
    assert run_cli(capsys, "train", b_cfg, "--quiet", "--set", "optimizer.lr=1e-3")[0] == 0
    a_out, b_out = workdir / "runs" / "a", workdir / "runs" / "b"
    png = tmp_path / "plots" / "ab.png"
    code, out, _ = run_cli(capsys, "compare", a_out, b_out, "--out", png)
    assert code == 0
    assert diff_lines(out) == ["optimizer.lr: 0.003 -> 0.001"]
    for run_dir in (a_out, b_out):
        run = json.loads((run_dir / "run.json").read_text())
        assert f"run {run['run_id']}  config {run['config_hash']}" in out
    assert "run.name, run.output_dir differ too" in out
    assert f"loss curves: {png}" in out and png.read_bytes()[:8] == PNG_MAGIC

    # The same run twice; the default plot goes to the working directory.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        code, out, _ = run_cli(capsys, "compare", a_out, a_out)
    assert code == 0 and "identical configs" in out and not diff_lines(out)
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_MAGIC

    # A run folder from before run.json: the newest checkpoint has the config and the run id.
    (b_out / "run.json").unlink()
    code, out, _ = run_cli(capsys, "compare", a_out, b_out, "--out", png)
    assert code == 0 and diff_lines(out) == ["optimizer.lr: 0.003 -> 0.001"]


def test_compare_bad_input_is_one_line_with_exit_code_2(capsys, workdir):
    empty = workdir / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "compare", empty, empty)
    assert code == 2 and err.strip() == f"error: {empty} is not a run folder (no metrics.jsonl)"
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    code, _, err = run_cli(capsys, "compare", empty, empty)
    assert code == 2 and err.strip() == f"error: {empty} is not a run folder (no run.json)"
    code, _, err = run_cli(capsys, "compare", workdir / "nowhere", empty)
    assert code == 2 and err.strip() == f"error: {workdir / 'nowhere'} is not a folder"
    code, _, err = run_cli(capsys, "compare", empty)
    assert code == 2 and err.strip().count("\n") == 0 and "RUN_DIR" in err


def test_resume_under_changed_hooks_is_refused_unless_allowed(capsys, workdir):
    cfg_file = write_cfg(workdir, "hk")
    cfg = load_config(cfg_file)
    T.train(cfg, progress=False, log=lambda m: None, stop_at_step=3)
    capsys.readouterr()
    out = cfg.output_dir
    run_id = json.loads((out / "run.json").read_text())["run_id"]

    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet", "--set", HOOK)
    assert code == 2 and err.strip().count("\n") == 0
    assert "different hooks.forward;" in err and "--allow-config-change" in err
    # Nothing was touched by the refused attempt.
    assert json.loads((out / "run.json").read_text())["resumes"] == []
    assert max(r["step"] for r in read_metrics(out)) == 3

    # [model] comes from the checkpoint's weights: not even the flag resumes across it.
    argv = ["train", cfg_file, "--quiet", "--allow-config-change", "--set", "model.spec.dropout=0.1"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "different model.spec.dropout;" in err

    code, _, err = run_cli(capsys, "train", cfg_file, "--quiet", "--allow-config-change", "--set", HOOK)
    assert code == 0, err
    assert "warning: resuming from" in err and "hooks.forward" in err
    hooked = load_config(cfg_file, [HOOK])
    run = json.loads((out / "run.json").read_text())
    assert run["run_id"] == run_id and run["config_hash"] == hooked.hash() != cfg.hash()
    assert [(r["step"], r["changed"]) for r in run["resumes"]] == [(3, ["hooks.forward"])]
    rows = read_metrics(out)
    assert {r["run_id"] for r in rows} == {run_id}
    assert {r["config_hash"] for r in rows if r["step"] <= 3} == {cfg.hash()}
    assert {r["config_hash"] for r in rows if r["step"] > 3} == {hooked.hash()}
    meta = json.loads((ck.list_checkpoints(out / "checkpoints")[-1][1] / "metadata.json").read_text())
    assert meta["run_id"] == run_id and meta["config_hash"] == hooked.hash()
    # compare points out that the curve spans two configs.
    code, out_text, _ = run_cli(capsys, "compare", out, out, "--out", workdir / "c.png")
    assert code == 0 and f"spans configs {cfg.hash()}, {hooked.hash()}" in out_text


def test_resume_with_only_max_steps_changed_is_allowed(capsys, workdir):
    cfg_file = write_cfg(workdir, "longer")
    cfg = load_config(cfg_file)
    T.train(cfg, progress=False, log=lambda m: None, stop_at_step=3)
    capsys.readouterr()
    run_id = json.loads((cfg.output_dir / "run.json").read_text())["run_id"]
    code, out, err = run_cli(capsys, "train", cfg_file, "--quiet", "--set", "train.max_steps=8")
    assert code == 0, err
    assert "steps: 8" in out and "note: resuming with changed train.max_steps" in err
    run = json.loads((cfg.output_dir / "run.json").read_text())
    assert run["run_id"] == run_id and run["resumes"][0]["changed"] == ["train.max_steps"]
    assert [r["step"] for r in read_metrics(cfg.output_dir) if "loss" in r] == list(range(1, 9))

"""Device selection (`hardware.device`), `metalcandle env`, and memory in the metrics."""

import pytest

from conftest import read_metrics, run_cli, write_config, write_corpus
from metalcandle import _core, devices
from metalcandle.errors import UserError


def test_this_build_reports_itself_and_auto_is_the_cpu(capsys):
    info = _core.build_info()
    assert info["arch"] and info["threads"] >= 1 and isinstance(info["simd"], list)
    if "cuda" not in info["features"]:
        assert not info["cuda_available"] and info["cuda_error"]
        with pytest.raises(UserError, match='device "cuda" is not in this build.*--features cuda'):
            devices.resolve_device("cuda")
        assert devices.resolve_device("auto") == "cpu"
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and f"threads: {info['threads']}" in out and "device auto -> " in out


@pytest.mark.parametrize(
    ("present", "want", "said"),
    [(True, "cuda", []), (False, "cpu", ["device auto: using the CPU (cuda: no driver)"])],
)
def test_auto_takes_a_present_gpu_and_says_why_not(monkeypatch, present, want, said):
    info = dict(_core.build_info(), features=["cuda"], cuda_available=present)
    info["cuda_error"] = None if present else "no driver"
    monkeypatch.setattr(devices._core, "build_info", lambda: info)
    lines = []
    assert devices.resolve_device("auto", say=lines.append) == want
    assert lines == said
    if not present:
        with pytest.raises(UserError, match='device "cuda" cannot be opened: no driver'):
            devices.resolve_device("cuda")


def test_training_lines_carry_resident_memory(tmp_path):
    from metalcandle.config import load_config
    from metalcandle.train import train

    write_corpus(tmp_path)
    cfg = write_config(tmp_path / "c.toml", "mem", tmp_path / "out", tmp_path / "models", steps=2)
    train(load_config(cfg), progress=False, log=lambda m: None)
    rows = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert rows and all(0 < r["rss_mib"] <= r["peak_rss_mib"] for r in rows)

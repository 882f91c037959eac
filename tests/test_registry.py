"""The model registry: entries, lineage, and concurrent writers."""

import json
import multiprocessing as mp

import pytest

from metalcandle.errors import UserError
from metalcandle.registry import ENTRY_KEYS, Registry, default_models_dir, read_license


def test_register_get_and_lineage(tmp_path):
    reg = Registry(tmp_path / "models")
    reg.register({"model_name": "base", "architecture_type": "qwen", "source": "local:/x"})
    reg.register({"model_name": "ft1", "architecture_type": "qwen", "fine_tuned_from": "base"})
    reg.register({"model_name": "ft2", "architecture_type": "qwen", "fine_tuned_from": "ft1"})
    e = reg.get("ft2")
    assert set(ENTRY_KEYS) <= set(e)
    assert e["model_id"].startswith("mc-") and e["created_at"]
    assert reg.lineage("ft2") == ["ft2", "ft1", "base"]
    assert [x["model_name"] for x in reg.entries()] == ["base", "ft1", "ft2"]
    on_disk = json.loads((tmp_path / "models" / "registry.json").read_text())
    assert sorted(on_disk["models"]) == ["base", "ft1", "ft2"]


def test_duplicate_and_unknown_names(tmp_path):
    reg = Registry(tmp_path)
    reg.register({"model_name": "qwen-small"})
    with pytest.raises(UserError, match="already in the registry"):
        reg.register({"model_name": "qwen-small"})
    reg.register({"model_name": "qwen-small", "license": "mit"}, overwrite=True)
    assert reg.get("qwen-small")["license"] == "mit"
    with pytest.raises(UserError, match="did you mean 'qwen-small'"):
        reg.get("qwen-smal")


def test_models_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("METALCANDLE_MODELS_DIR", raising=False)
    assert default_models_dir() == tmp_path / "models"
    monkeypatch.setenv("METALCANDLE_MODELS_DIR", str(tmp_path / "env"))
    assert default_models_dir() == tmp_path / "env"
    assert default_models_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"


def _writer(args):
    models_dir, worker, count = args
    reg = Registry(models_dir)
    for i in range(count):
        reg.register({"model_name": f"w{worker}-m{i}", "architecture_type": "gpt2"})
    return worker


def test_concurrent_writers_lose_nothing(tmp_path):
    # Several processes read-modify-write the same registry at once; with the lock and the atomic
    # replace every entry survives and the file is always valid JSON.
    workers, count = 6, 15
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_writer, [(str(tmp_path), w, count) for w in range(workers)])
    data = json.loads((tmp_path / "registry.json").read_text())
    assert len(data["models"]) == workers * count
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".registry.json.")]  # no temp files left


def test_read_license_from_model_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- x\n---\n# Model\n")
    assert read_license(tmp_path) == "apache-2.0"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert read_license(tmp_path) is None

"""The model registry: `<models_dir>/registry.json` plus one folder per model.

Writers take an exclusive lock on `registry.lock` for the whole read-modify-write and replace the
JSON atomically (write a temp file, fsync, `os.replace`), so concurrent processes never lose each
other's entries and a reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import uuid
from pathlib import Path

from metalcandle.checkpoint import read_json, write_json_atomic
from metalcandle.errors import UserError, did_you_mean

REGISTRY_FILE = "registry.json"
LOCK_FILE = "registry.lock"
ENTRY_KEYS = (
    "model_name",
    "model_id",
    "architecture_type",
    "source",
    "path",
    "fine_tuned_from",
    "created_at",
    "license",
)


NAME_MAX = 100
_NAME_CHARS = "letters, digits, '.', '_' and '-'"


def check_name(name, what: str = "model name") -> str:
    """`name` if it is a plain name that can be a folder of its own: letters, digits, ".", "_", "-",
    not starting with "." or "-", at most NAME_MAX characters; else a UserError saying so."""
    ok = (
        isinstance(name, str)
        and 0 < len(name) <= NAME_MAX
        and name[0] not in ".-"
        and all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    )
    if not ok:
        raise UserError(
            f"{what} {name!r} is not a plain name: use 1 to {NAME_MAX} {_NAME_CHARS}, "
            "not starting with '.' or '-' (no path separators, '..', spaces or control characters)"
        )
    return name


def default_models_dir(configured: str | None = None) -> Path:
    """`[run] models_dir` if set, else $METALCANDLE_MODELS_DIR, else ./models."""
    d = configured or os.environ.get("METALCANDLE_MODELS_DIR") or "models"
    return Path(os.path.expanduser(d)).absolute()


def new_model_id() -> str:
    return "mc-" + uuid.uuid4().hex[:12]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Registry:
    def __init__(self, models_dir: str | os.PathLike | None = None):
        self.dir = Path(models_dir).absolute() if models_dir else default_models_dir()
        self.file = self.dir / REGISTRY_FILE

    @contextlib.contextmanager
    def _locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict:
        if not self.file.exists():
            return {"models": {}}
        try:
            data = read_json(self.file)
        except json.JSONDecodeError as e:
            raise UserError(f"{self.file}: corrupt registry ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.setdefault("models", {}), dict):
            raise UserError(f'{self.file}: corrupt registry (expected {{"models": {{...}}}})')
        for name, entry in data["models"].items():
            self._check_entry(name, entry)
        return data

    def _check_entry(self, name, entry) -> None:
        """An entry read back must be a plain name whose path is that name's folder in this
        registry, so an edited registry.json cannot point a load or an overwrite elsewhere."""
        try:
            check_name(name)
        except UserError as e:
            raise UserError(f"{self.file}: {e}") from None
        if not isinstance(entry, dict) or entry.get("model_name") != name:
            raise UserError(f"{self.file}: entry '{name}' is not an object with model_name '{name}'")
        path = entry.get("path")
        if not isinstance(path, str) or os.path.normpath(path) != str(self.dir / name):
            raise UserError(
                f"{self.file}: entry '{name}' has path {path!r}; a registered model lives in "
                f"{self.dir / name}"
            )

    def entries(self) -> list[dict]:
        return sorted(self._read()["models"].values(), key=lambda e: e.get("created_at") or "")

    def get(self, name: str) -> dict:
        check_name(name)
        models = self._read()["models"]
        if name not in models:
            hint = did_you_mean(name, models) or " (see `metalcandle models`)"
            raise UserError(f"model '{name}' is not in the registry {self.file}{hint}")
        return models[name]

    def __contains__(self, name: str) -> bool:
        return name in self._read()["models"]

    def register(self, entry: dict, overwrite: bool = False) -> dict:
        """Adds an entry (missing fields filled in). Fails if the name exists unless overwrite."""
        entry = {k: entry.get(k) for k in ENTRY_KEYS} | {
            k: v for k, v in entry.items() if k not in ENTRY_KEYS
        }
        if not entry["model_name"]:
            raise ValueError("registry entry needs a model_name")
        check_name(entry["model_name"])
        folder = str(self.dir / entry["model_name"])
        if entry["path"] is None:
            entry["path"] = folder
        elif os.path.normpath(str(entry["path"])) != folder:
            raise ValueError(
                f"registry entry {entry['model_name']!r}: path must be {folder}, got {entry['path']}"
            )
        entry["model_id"] = entry["model_id"] or new_model_id()
        entry["created_at"] = entry["created_at"] or now_iso()
        with self._locked():
            data = self._read()
            if entry["model_name"] in data["models"] and not overwrite:
                raise UserError(
                    f"model '{entry['model_name']}' is already in the registry {self.file}; "
                    "choose another --name"
                )
            data["models"][entry["model_name"]] = entry
            write_json_atomic(self.file, data)
        return entry

    def lineage(self, name: str) -> list[str]:
        """[name, its base, the base's base, ...] following fine_tuned_from."""
        models = self._read()["models"]
        chain, seen = [name], {name}
        while (parent := models.get(chain[-1], {}).get("fine_tuned_from")) and parent not in seen:
            chain.append(parent)
            seen.add(parent)
        return chain


def read_license(folder: Path) -> str | None:
    """The `license:` field of a Hugging Face model card's front matter, if there is one."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None

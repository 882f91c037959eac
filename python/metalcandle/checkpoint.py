"""Checkpoint folders: atomic writes, listing, pruning and resume lookup.

A checkpoint folder is itself loadable: the weights sit at its top level (a Hugging Face folder
for full training, a PEFT adapter folder for LoRA) next to the tokenizer, so `load_model` and
`load_tokenizer` take it directly. Beside them: `trainer_state/` (optimizer moments and step
counters), `state.json` (step, data position, early-stopping counters), `run_config.toml` and
`run_config.json` (the resolved config and its hash) and `metadata.json` (model lineage, run id
and config hash).

Every checkpoint is written into a hidden temp folder and renamed into place, so a crash mid-write
leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metalcandle.errors import BadFileError, UserError

STATE_FILE = "state.json"
METADATA_FILE = "metadata.json"
TRAINER_DIR = "trainer_state"
# The resolved run config; not "config.json", which is the model's own config in the same folder.
RUN_CONFIG_TOML = "run_config.toml"
RUN_CONFIG_JSON = "run_config.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def write_atomic_dir(dest: Path, write: Callable[[Path], None]) -> Path:
    """Calls `write(tmp)` on a fresh temp folder beside `dest`, then renames it to `dest`
    (replacing an older `dest` only after the new one is complete)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            old = dest.parent / f".old-{dest.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _fsync_tree(root: Path) -> None:
    # The rename is only atomic with respect to contents that reached the disk first.
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete `step-N` checkpoint, oldest first."""
    if not Path(ckpt_root).is_dir():
        return []
    out = []
    for p in Path(ckpt_root).iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and is_checkpoint(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete step checkpoint in `ckpt_root`, or None."""
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def prune(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Deletes all but the newest `keep_last` step checkpoints; returns what was removed."""
    ckpts = list_checkpoints(ckpt_root)
    removed = [p for _, p in ckpts[: max(0, len(ckpts) - keep_last)]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else is a BadFileError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadFileError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_json` into a temp file beside `path`, renamed into place: readers see the old or the
    new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def resolve_resume(resume, output_dir: Path) -> Path | None:
    """The checkpoint to resume from: "auto" picks the newest in OUTPUT_DIR/checkpoints (None when
    there is none), a path must be a checkpoint, False never resumes."""
    if resume is False:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir / "checkpoints")
    path = Path(os.path.expanduser(resume)).absolute()
    if not is_checkpoint(path):
        raise UserError(f"train.resume: {path} is not a checkpoint folder (no {STATE_FILE})")
    return path

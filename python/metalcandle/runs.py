"""Run identity, the resume guard and `metalcandle compare`: what keeps comparisons between runs honest.

Every run gets a run id when it starts fresh (`<name>-<UTC time>-<6 hex>`; a resumed run keeps its
own) and is known by the hash of its resolved config, hooks included and [hardware] left out
(the same run on other hardware settings keeps its hash). Both are stamped on every
`metrics.jsonl` line and every checkpoint, and kept, with the resolved config, in
`OUTPUT_DIR/run.json`. A resume under a config that differs in anything but a few bookkeeping keys
(`FREE_ON_RESUME`) is refused unless asked for with `--allow-config-change`, and from then on the
metrics lines carry the new hash, so a curve never silently mixes two configs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metalcandle import checkpoint as ck
from metalcandle.config import ABSENT, SCHEMA, Config, diff_configs, upgrade_saved
from metalcandle.errors import UserError
from metalcandle.plotting import plot_runs, read_metrics

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"

# Keys a resume may change without --allow-config-change: how long the run goes on, how often it
# logs, evaluates and saves, where and how it computes (every [hardware] key but dtype), where it
# writes, and the qualitative samples. Lengthening a run is the usual reason to resume with another
# config; it stretches the learning-rate schedule of the remaining steps, which the config hash on
# each metrics line records.
FREE_ON_RESUME = (
    "train.max_steps",
    "train.epochs",
    "train.resume",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "hardware.device",
    "hardware.threads",
    "hardware.gradient_checkpointing",
    "hardware.fused",
    "run.output_dir",
    "run.models_dir",
    "generate",
)
# Sections a resumed run takes from the checkpoint (its weights, adapter and tokenizer are loaded as
# saved): a changed value would be ignored while the run claimed it, so even --allow-config-change
# does not resume across them.
FIXED_BY_CHECKPOINT = ("model", "tokenizer", "lora")
# Two runs being compared always live in different folders and usually have different names;
# these are shown with each run rather than listed as differences.
PLACEMENT_KEYS = ("run.name", "run.output_dir")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith((p + ".", p + "[")) for p in prefixes)


def _free_keys() -> str:
    return ", ".join(p if "." in p else f"{p}.*" for p in FREE_ON_RESUME)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id(name: str) -> str:
    """`<name>-<YYYYMMDDTHHMMSSZ>-<6 hex>`: sorts by start time, readable, unique without a lock."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
    return f"{slug}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def upgraded(config: dict) -> dict:
    """A saved resolved config as this version resolves it: one saved before [hooks] existed gets
    the empty hooks it ran with, one saved before [hardware] its settings there (`upgrade_saved`),
    one saved before [quantization] none."""
    config = upgrade_saved(config)
    config.setdefault("quantization", None)  # saved before quantization-aware training existed
    if config.get("hooks") is None:
        config["hooks"] = {k: [] for k in SCHEMA["hooks"]}
    return config


def _check_dtype(cfg: Config, saved: dict, checkpoint: Path, start_over: str) -> None:
    """The optimizer state is saved in the weights' dtype and read back as saved, so a resume in
    another dtype would fail at its first step: refused before, naming the dtype to resume in."""
    was, now = saved["hardware"]["dtype"], cfg["hardware"]["dtype"]
    if was != now:
        raise UserError(
            f'cannot resume from {checkpoint}: it was trained with hardware.dtype = "{was}" (its '
            f'optimizer state is in that dtype), not "{now}"; set hardware.dtype = "{was}" to resume, '
            f"or {start_over}"
        )


def check_resume(
    cfg: Config, saved: dict, checkpoint: Path, allow_config_change: bool, say: Callable[[str], None]
) -> list[str]:
    """The dotted keys in which `cfg` differs from `saved`, the resolved config `checkpoint` was
    trained with. Only FREE_ON_RESUME keys may differ; others (hooks always among them) raise a
    UserError naming them unless `allow_config_change`, and FIXED_BY_CHECKPOINT keys and
    hardware.dtype raise even then."""
    saved = upgraded(saved)
    start_over = "use another run.output_dir or --set train.resume=false to start over"
    _check_dtype(cfg, saved, checkpoint, start_over)
    changed = [k for k, _, _ in diff_configs(saved, cfg.to_dict())]
    free = [k for k in changed if _under(k, FREE_ON_RESUME)]
    fixed = [k for k in changed if _under(k, FIXED_BY_CHECKPOINT)]
    other = [k for k in changed if k not in free and k not in fixed]
    head = f"cannot resume from {checkpoint}: it was trained with different"
    if fixed:
        raise UserError(
            f"{head} {', '.join(fixed + other)}; {start_over} ([model], [tokenizer] and [lora] come "
            "from the checkpoint, so --allow-config-change cannot change them)"
        )
    if other and not allow_config_change:
        raise UserError(
            f"{head} {', '.join(other)}; {start_over}, or pass --allow-config-change to resume anyway "
            f"(free to change on resume: {_free_keys()})"
        )
    if other:
        say(
            f"warning: resuming from {checkpoint} with different {', '.join(other)} "
            f"(--allow-config-change); metrics and checkpoints from here on carry config hash {cfg.hash()}"
        )
    if free:
        say(f"note: resuming with changed {', '.join(free)}")
    return changed


def write_run_file(
    out: Path, cfg: Config, run_id: str, created_at: str, resumed: dict | None = None, ranks: int = 1
) -> Path:
    """OUTPUT_DIR/run.json: the run id, the current config and its hash, the number of
    data-parallel ranks, and one entry per resume (step, checkpoint, the hash before, the keys
    that changed and the ranks it resumed on)."""
    path = Path(out) / RUN_FILE
    resumes = []
    if resumed is not None:
        try:
            old = ck.read_json(path)
        except (OSError, ValueError):
            old = {}
        if old.get("run_id") == run_id:
            resumes = list(old.get("resumes") or [])
        resumes.append(resumed)
    data = {
        "run_id": run_id,
        "config_hash": cfg.hash(),
        "config": cfg.to_dict(),
        "created_at": created_at,
        "ranks": ranks,
        "resumes": resumes,
    }
    ck.write_json_atomic(path, data)
    return path


# --- metalcandle compare --------------------------------------------------------------------------


@dataclass
class RunInfo:
    path: Path
    run_id: str
    config_hash: str
    config: dict
    metrics: Path
    metric_hashes: list[str]  # config hashes on the metrics lines, in order of appearance


def _read_json(path: Path) -> dict:
    try:
        data = ck.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _metric_hashes(metrics: Path) -> list[str]:
    hashes: list[str] = []
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{metrics}:{n}: not a JSON line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{metrics}:{n}: not a metrics line (no step)")
        h = row.get("config_hash")
        if h is not None and h not in hashes:
            hashes.append(h)
    return hashes


def load_run(folder: str | os.PathLike) -> RunInfo:
    """A run's identity, config and metrics from its output folder."""
    folder = Path(os.path.expanduser(folder)).absolute()
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder")
    metrics = folder / METRICS_FILE
    if not metrics.is_file():
        raise UserError(f"{folder} is not a run folder (no {METRICS_FILE})")
    if (folder / RUN_FILE).is_file():
        data = _read_json(folder / RUN_FILE)
        missing = [k for k in ("run_id", "config_hash", "config") if k not in data]
        if missing:
            raise UserError(f"{folder / RUN_FILE}: not a run file (no {', '.join(missing)})")
        run_id, config_hash, config = data["run_id"], data["config_hash"], data["config"]
    else:
        # A run from before run.json existed: its newest checkpoint has the config.
        last = ck.latest_checkpoint(folder / "checkpoints")
        if last is None or not (last / ck.RUN_CONFIG_JSON).is_file():
            raise UserError(f"{folder} is not a run folder (no {RUN_FILE})")
        saved = _read_json(last / ck.RUN_CONFIG_JSON)
        state = _read_json(last / ck.STATE_FILE)
        run_id, config_hash, config = state.get("run_id") or "(none)", saved.get("hash"), saved["config"]
    return RunInfo(folder, run_id, config_hash, upgraded(config), metrics, _metric_hashes(metrics))


def _fmt(v: Any) -> str:
    return repr(v) if v is ABSENT else json.dumps(v)


def _loss_summary(run: RunInfo) -> str:
    train, valid = read_metrics(run.metrics)
    parts = [f"last train loss {train[-1][1]:.4f} at step {train[-1][0]}" if train else "no train loss"]
    if valid:
        step, best = min(valid, key=lambda sv: sv[1])
        parts.append(f"best val_loss {best:.4f} at step {step}")
    return "; ".join(parts)


def compare(a_dir, b_dir, png: str | os.PathLike | None = None) -> tuple[list[str], Path]:
    """The report `metalcandle compare` prints (the two runs, then every config key that differs as
    `key: A -> B`) and the PNG with both runs' loss curves (default ./compare.png)."""
    a, b = load_run(a_dir), load_run(b_dir)
    lines = []
    for tag, r in (("A", a), ("B", b)):
        lines.append(f"{tag}: {r.path}  run {r.run_id}  config {r.config_hash}")
        lines.append(f"   {_loss_summary(r)}")
        if len(r.metric_hashes) > 1:
            lines.append(
                f"   note: its metrics.jsonl spans configs {', '.join(r.metric_hashes)} "
                "(resumed with a changed config)"
            )
    diffs = diff_configs(a.config, b.config)
    shown = [d for d in diffs if not _under(d[0], PLACEMENT_KEYS)]
    placed = [d[0] for d in diffs if _under(d[0], PLACEMENT_KEYS)]
    if not shown:
        lines.append("identical configs" + (f" (apart from {', '.join(placed)})" if placed else ""))
    else:
        lines.append(f"{len(shown)} differing key{'s' if len(shown) > 1 else ''} (A -> B):")
        lines += [f"  {k}: {_fmt(x)} -> {_fmt(y)}" for k, x, y in shown]
        if placed:
            lines.append(f"({', '.join(placed)} differ too; they only name and place the runs)")
    png = Path(os.path.expanduser(png)).absolute() if png else Path("compare.png").absolute()
    png.parent.mkdir(parents=True, exist_ok=True)
    names = [r.config.get("run", {}).get("name") or r.path.name for r in (a, b)]
    plot_runs(
        [(f"A ({names[0]})", a.metrics), (f"B ({names[1]})", b.metrics)],
        png,
        title=f"{names[0]} vs {names[1]}",
    )
    lines.append(f"loss curves: {png}")
    return lines, png

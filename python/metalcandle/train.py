"""The training loop behind `metalcandle train`: data, model, optimizer, schedule, evaluation,
checkpoints, resume, early stopping, metrics and registration of the finished model.

The tensor work (forward, loss, backward, clipping, AdamW) is one `Trainer.step` call into Rust;
everything here is bookkeeping whose state fits in `state.json`, which is what makes resuming exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metalcandle import checkpoint as ck
from metalcandle import data as D
from metalcandle import runs as R
from metalcandle.adapters import architecture_type_of
from metalcandle.config import Config, to_toml
from metalcandle.devices import apply_threads
from metalcandle.distributed import Distributed, as_distributed, rank_slice
from metalcandle.errors import BadFileError, TrainingInterrupted, UserError
from metalcandle.generate import generation_options
from metalcandle.hooks import attach_hooks
from metalcandle.loading import (
    BaseModel,
    build_tokenizer,
    device_of,
    load_folder_tokenizer,
    load_model_dir,
    resolve_base,
    scratch_model_config,
    untrained_error,
    use_hardware,
)
from metalcandle.plotting import plot_loss
from metalcandle.progress import Progress, peak_rss_mib, rss_mib
from metalcandle.registry import Registry, new_model_id, read_license
from metalcandle.schedule import lr_at

NUM_SAMPLES = 3  # continuations logged at each evaluation


@dataclass
class RunState:
    """Everything besides weights and optimizer moments that a resumed run needs."""

    step: int = 0
    data_position: int = 0  # windows consumed; the shuffled order is a function of it
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    model_id: str = field(default_factory=new_model_id)
    stopped_early: bool = False  # so a resumed run that had already stopped early stays stopped
    run_id: str = ""  # given when the run starts fresh; kept across resumes
    run_created_at: str = ""

    @classmethod
    def from_saved(cls, saved: dict, path: Path) -> RunState:
        """The state a checkpoint's state.json holds, each field of its type, else a BadFileError."""
        kinds = {
            "step": int,
            "data_position": int,
            "tokens_seen": int,
            "best_val_loss": (float, int, type(None)),
            "best_step": (int, type(None)),
            "evals_since_best": int,
            "model_id": str,
            "stopped_early": bool,
            "run_id": str,
            "run_created_at": str,
        }
        for key, value in saved.items():
            if key not in kinds:
                raise BadFileError(f"{path}: unknown key {key!r}")
            kind = kinds[key]
            bad_bool = isinstance(value, bool) and kind is not bool
            if (
                bad_bool
                or not isinstance(value, kind)
                or (isinstance(value, int) and kind is int and value < 0)
            ):
                raise BadFileError(f"{path}: {key} = {value!r} is not a valid value")
        return cls(**saved)


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    tokens_per_s: float
    registered_as: str | None


@dataclass
class Datasets:
    train: D.Windows
    valid: D.Windows


def train_files(cfg: Config) -> list[Path]:
    return [cfg.input_path(p) for p in cfg["data"]["train"]]


def load_datasets(cfg: Config, tokenizer) -> Datasets:
    d = cfg["data"]
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def windows(files):
        examples = D.read_examples(files, d["format"], tokenizer, d["mask_prompt"])
        return D.build_windows(examples, d["seq_len"], d["packing"], pad)

    train = windows(train_files(cfg))
    if d["valid"] is not None:
        valid = windows([cfg.input_path(p) for p in d["valid"]])
    else:
        train, valid = D.split_windows(train, d["valid_fraction"], cfg["run"]["seed"])
    if len(train) == 0 or len(valid) == 0:
        raise UserError(f"{cfg.source}: not enough data for seq_len {d['seq_len']}")
    return Datasets(train, valid)


def total_steps(cfg: Config, num_train_windows: int) -> int:
    t = cfg["train"]
    if t["max_steps"] is not None:
        return t["max_steps"]
    return D.steps_for_epochs(t["epochs"], num_train_windows, t["batch_size"], t["grad_accum"])


def make_optimizer(cfg: Config):
    import metalcandle as mc

    o = cfg["optimizer"]
    if o["name"] == "sgd":
        return mc.SGD(
            lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"], nesterov=o["nesterov"]
        )
    if o["name"] == "lion":
        return mc.Lion(lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    return mc.AdamW(lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"], weight_decay=o["weight_decay"])


def evaluate(trainer, batches) -> tuple[float, float]:
    """Token-weighted mean validation loss over fixed batches, and its perplexity."""
    loss, _ = trainer.evaluate(batches)
    return loss, math.exp(min(loss, 700.0))


def sample_prompts(valid: D.Windows, tokenizer, n: int = NUM_SAMPLES) -> list[str]:
    """Prompts for the qualitative samples, the same at every evaluation, from rows spread over the
    validation set: a row's masked prefix (the prompt of a completion or chat example, up to the
    generation prompt), or for plain text its first few tokens."""
    length = max(1, min(24, valid.input_ids.shape[1] // 4))
    rows = np.unique(np.linspace(0, len(valid) - 1, num=min(n, len(valid))).astype(int))
    prompts = []
    for r in rows:
        ids, labels = valid.input_ids[r], valid.labels[r]
        learned = np.flatnonzero(labels != D.IGNORE)
        end = int(learned[0]) if len(learned) and learned[0] > 0 else length
        prompts.append(tokenizer.decode(ids[:end].tolist()))
    return prompts


def sample_continuations(model, tokenizer, prompts: list[str], gen_opts: dict) -> list[str]:
    from metalcandle.generate import generate_text

    out = []
    context = model.max_position_embeddings
    for i, p in enumerate(prompts):
        ids = tokenizer.encode(p)
        # Stay inside the context so generate does not warn at every evaluation; a seed per
        # prompt so the samples differ, the same at every evaluation so they compare.
        room = max(0, context - len(ids))
        opts = dict(gen_opts, max_new_tokens=min(gen_opts["max_new_tokens"], room))
        if "seed" in opts:
            opts["seed"] += i
        out.append(generate_text(model, tokenizer, ids, **opts))
    return out


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, appended and flushed as the run goes. Only the
    rank that writes files (`enabled`) touches it."""

    def __init__(self, path: Path, resume_step: int | None, stamp: dict | None = None, enabled: bool = True):
        self.path = path
        self.stamp = stamp or {}  # on every line: which run, under which config, on how many ranks
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            # Lines past the checkpoint came from the interrupted attempt; the resumed run redoes them.
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln)["step"] <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and path.exists():
            path.unlink()

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, **self.stamp}) + "\n")


def metadata_for(cfg: Config, state: RunState, base: BaseModel | None, architecture: str) -> dict:
    return {
        "model_name": cfg["run"]["name"],
        "model_id": state.model_id,
        "model_source": "metalcandle-train",
        "fine_tuned_from": None if base is None else base.name,
        "base_model_path": None if base is None else str(base.path),
        "architecture_type": architecture,
        "training": "lora" if cfg.is_lora else ("full" if base is not None else "from-scratch"),
        "license": None if base is None else (base.entry.get("license") or read_license(base.path)),
        "run_id": state.run_id,
        "config_hash": cfg.hash(),
    }


def save_checkpoint(dest: Path, cfg: Config, model, trainer, tokenizer, state: RunState, meta: dict) -> Path:
    resolved, config_hash = cfg.to_dict(), cfg.hash()

    def write(tmp: Path):
        if cfg.is_lora:
            model.save_adapter(tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save(tmp)
        trainer.save_state(tmp / ck.TRAINER_DIR)
        (tmp / ck.RUN_CONFIG_TOML).write_text(to_toml(resolved), encoding="utf-8")
        ck.write_json(tmp / ck.RUN_CONFIG_JSON, {"config": resolved, "hash": config_hash})
        ck.write_json(tmp / ck.METADATA_FILE, meta)
        # Written last: a folder is a checkpoint only once state.json is in it.
        ck.write_json(tmp / ck.STATE_FILE, {**state.__dict__, "config_hash": config_hash})

    return ck.write_atomic_dir(dest, write)


def build_model(cfg: Config, base: BaseModel | None, tokenizer, resume_from: Path | None):
    import metalcandle as mc

    device, dtype = device_of(cfg), cfg["hardware"]["dtype"]
    if base is None:
        if resume_from is not None:
            return mc.load_model(resume_from, dtype=dtype, device=device)
        model = mc.Model.from_config(
            scratch_model_config(cfg, tokenizer.vocab_size), seed=cfg["run"]["seed"], device=device
        )
        return in_dtype(model, dtype, device)
    if cfg.is_lora:
        model = load_model_dir(base.path, device, dtype, cfg.models_dir)
        if resume_from is not None:
            model.load_adapter(resume_from)
        else:
            lo = cfg["lora"]
            model.add_lora(
                r=lo["r"],
                alpha=lo["alpha"],
                dropout=lo["dropout"],
                target_modules=lo["target_modules"],
                seed=cfg["run"]["seed"],
                use_rslora=lo["use_rslora"],
            )
        return model
    return load_model_dir(resume_from or base.path, device, dtype, cfg.models_dir)


def enable_qat(cfg: Config, model) -> str | None:
    """Turns on [quantization] qat for `model` (training steps and evaluation see the rounded
    weights); the line to print, or None without the section."""
    import metalcandle as mc

    q = cfg["quantization"]
    if q is None:
        return None
    report = mc.enable_qat(model, q["qat"], skip=q["skip"])
    kept = [k for k, why in report["kept_float"].items() if why != "not selected"]
    line = f"quantization-aware training: {len(report['quantized'])} matrices rounded to {q['qat']} each step"
    return line + (f", {len(kept)} kept float ({', '.join(kept)})" if kept else "")


def in_dtype(model, dtype: str, device: str):
    """`model` with its weights in `dtype`. The core makes a new model in float32 only; another
    dtype is had the way a checkpoint gets it, by writing the weights and reading them back."""
    import tempfile

    import metalcandle as mc

    if dtype == "float32":
        return model
    with tempfile.TemporaryDirectory(prefix="metalcandle-dtype-") as tmp:
        model.save_pretrained(tmp)
        return mc.load_model(tmp, dtype=dtype, device=device)


@contextlib.contextmanager
def sigint_deferred():
    """Holds Ctrl-C back until the block ends, then delivers it. The core does not check for signals,
    so a Ctrl-C during a step surfaces right after the weights were updated and before the step
    was counted; a checkpoint written then would pair step-k weights with step k-1 bookkeeping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: it cannot be put back
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # to whatever handler was there before, usually KeyboardInterrupt


def training_interrupted(cfg: Config, step: int, checkpoint: Path | None, saved: bool) -> TrainingInterrupted:
    """The one line for the user: where the work is and the command that continues it."""
    if checkpoint is None:
        return TrainingInterrupted(
            "interrupted before the first step finished; nothing to save", checkpoint=None, step=step
        )
    resume = cfg["train"]["resume"]
    if resume == "auto" or (resume and Path(os.path.expanduser(resume)).absolute() == checkpoint):
        how = "run the same command again to resume"
    else:
        # Rerunning as is would start over (resume = false) or go back to the older checkpoint.
        how = f"to resume, run it again with --set {shlex.quote(f'train.resume={checkpoint}')}"
    what = f"checkpoint saved in {checkpoint}" if saved else f"no step finished since {checkpoint}"
    return TrainingInterrupted(f"interrupted at step {step}: {what}; {how}", checkpoint=checkpoint, step=step)


def train(
    cfg: Config,
    progress: bool = True,
    stop_at_step: int | None = None,
    log=None,
    allow_config_change: bool = False,
    comm=None,
) -> TrainResult:
    """Runs (or resumes) the training described by `cfg`. `stop_at_step` ends the run early after
    saving a checkpoint there, as an interruption would (used to test exact resume). A resume under
    a config that differs in more than `runs.FREE_ON_RESUME` keys needs `allow_config_change`.

    With `comm` (see `metalcandle.distributed`) this is one rank of a data-parallel run: the same
    training on every rank, each on its slice of every global batch; rank 0 alone writes files and
    reports. An exception on one rank aborts them all."""
    dist = as_distributed(comm)
    if dist is None or dist.size == 1:
        return _train(cfg, progress, stop_at_step, log, allow_config_change, None)
    check_same_config(cfg, dist)
    rank_slice(cfg["train"]["batch_size"], dist)  # a batch that does not split: before any work
    # A rank killed outright cannot say so; MPI then reports its pid, which this line maps to a rank.
    where = dist.allgather(f"pid {os.getpid()} on {socket.gethostname()}")
    if dist.is_main:
        print(
            f"{dist.size} ranks: " + ", ".join(f"rank {r} = {w}" for r, w in enumerate(where)),
            file=sys.stderr,
        )
    try:
        return _train(cfg, progress, stop_at_step, log, allow_config_change, dist)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        dist.abort(e)
        raise


def check_same_config(cfg: Config, dist: Distributed) -> None:
    """Every rank must run the same resolved config (the hash), or they would train different
    models while summing each other's gradients. [hardware] may differ between ranks, but for its
    dtype: weights rounded to another precision on one rank would drift away from the others'."""
    hashes, dtypes = zip(*dist.allgather((cfg.hash(), cfg["hardware"]["dtype"])), strict=True)
    if len(set(hashes)) > 1:
        by_rank = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
        raise UserError(f"{cfg.source}: the ranks were given different configs (config hashes {by_rank})")
    if len(set(dtypes)) > 1:
        by_rank = ", ".join(f"rank {r}: {d}" for r, d in enumerate(dtypes))
        raise UserError(f"{cfg.source}: the ranks were given different hardware.dtype ({by_rank})")


def _train(cfg, progress, stop_at_step, log, allow_config_change, dist: Distributed | None) -> TrainResult:
    run = Run(cfg, log, allow_config_change, dist)
    due = lambda step, every: step % every == 0 or step == run.max_steps  # noqa: E731
    t = cfg["train"]
    run.bar = Progress(run.max_steps, initial=run.state.step, enabled=progress and run.main_rank)
    try:
        while run.state.step < run.max_steps and not run.state.stopped_early:
            step = run.step()
            if due(step, t["eval_every"]):
                run.evaluate(step)
            interrupted = stop_at_step is not None and step >= stop_at_step
            if due(step, t["save_every"]) or run.state.stopped_early or interrupted:
                run.save_step(step)
            if interrupted:
                break
    except KeyboardInterrupt as e:
        raise run.interrupted() from e
    finally:
        run.bar.close()
    return run.finish()


class Run:
    """One training run, fresh or resumed from its checkpoint: everything the loop in `_train`
    reads and writes. With `dist`, one rank of a data-parallel run: rank 0 alone writes files and
    reports."""

    def __init__(self, cfg: Config, log, allow_config_change: bool, dist: Distributed | None):
        import metalcandle as mc

        self.cfg, self.dist, self.log = cfg, dist, log
        self.main_rank = dist is None or dist.is_main
        apply_threads(cfg["hardware"]["threads"])  # before anything computes: see apply_threads
        self.out = cfg.output_dir
        self.resume_from = self._resume_point()
        self.base = resolve_base(cfg)
        self.state = self._starting_state(allow_config_change)

        tokenizer = (
            load_folder_tokenizer(self.resume_from, cfg.models_dir)
            if self.resume_from is not None
            else build_tokenizer(cfg, self.base, train_files(cfg))
        )
        data = load_datasets(cfg, tokenizer)
        if hasattr(tokenizer, "unknown_counts") and sum(tokenizer.unknown_counts.values()):
            self.say("note: " + tokenizer.unknown_summary())
        self.tokenizer, self.max_steps = tokenizer, total_steps(cfg, len(data.train))

        model = self.model = build_model(cfg, self.base, tokenizer, self.resume_from)
        attach_hooks(model, cfg["hooks"], cfg.source)  # before the first step, fresh or resumed alike
        if (qat := enable_qat(cfg, model)) is not None:
            self.say(qat)
        t, hw = cfg["train"], cfg["hardware"]
        self.opt = make_optimizer(cfg)
        self.trainer = mc.Trainer(
            model,
            self.opt,
            max_grad_norm=t["max_grad_norm"] or None,
            gradient_checkpointing=hw["gradient_checkpointing"],
            fused=hw["fused"],
            comm=dist,
            seed=cfg["run"]["seed"],
        )
        if self.resume_from is not None:
            self.trainer.load_state(self.resume_from / ck.TRAINER_DIR)
        check_step_memory(cfg, model)

        self.stream = D.BatchStream(data.train, t["batch_size"], cfg["run"]["seed"])
        self.stream.position = self.state.data_position
        self.valid_batches = D.eval_batches(data.valid, t["batch_size"], t["eval_batches"])
        self.prompts = sample_prompts(data.valid, tokenizer)
        self.gen_opts = generation_options(cfg["generate"])
        self.meta = metadata_for(cfg, self.state, self.base, architecture_type_of(model))
        self.metrics = MetricsLog(
            self.out / "metrics.jsonl",
            self.state.step if self.resume_from is not None else None,
            stamp={"run_id": self.state.run_id, "config_hash": cfg.hash(), "ranks": self.ranks},
            enabled=self.main_rank,
        )
        self.ckpt_root = self.out / "checkpoints"
        self.start_step, self.saved_step = self.state.step, None
        self.first_loss = self.last_loss = None
        self.window = Throughput()  # since the last metrics line
        self.total = Throughput()  # since this process started the run
        self.bar = Progress(0, enabled=False)

        if cfg.is_lora:
            trainable = sum(int(a.size) for a in model.trainable_parameters().values())
            size = f"{model.num_parameters():,} parameters, {trainable:,} trainable (LoRA)"
        else:
            size = f"{model.num_parameters():,} parameters"
        self.say(
            f"{cfg['run']['name']}: {model.architecture}, {size}, vocab {tokenizer.vocab_size}, "
            f"{len(data.train)} train / {len(data.valid)} valid windows of {cfg['data']['seq_len']} "
            f"tokens, {self.max_steps} steps"
        )

    @property
    def ranks(self) -> int:
        return 1 if self.dist is None else self.dist.size

    def say(self, msg: str) -> None:
        if self.main_rank:
            (self.log or (lambda m: print(m, file=sys.stderr)))(msg)

    def _resume_point(self) -> Path | None:
        """The checkpoint to resume from (train.resume), as rank 0 sees it."""
        out, dist = self.out, self.dist
        resume_from = None
        if self.main_rank:
            if out.exists() and not out.is_dir():
                raise UserError(f"run.output_dir: {out} exists and is not a folder")
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"run.output_dir: cannot create {out} ({e.strerror})") from None
            resume_from = ck.resolve_resume(self.cfg["train"]["resume"], out)
        if dist is not None:
            # Rank 0's choice, so an "auto" resume never depends on what another rank's disk shows.
            resume_from = dist.bcast(resume_from)
            if resume_from is not None and not ck.is_checkpoint(resume_from):
                raise UserError(
                    f"train.resume: rank {dist.rank} cannot read the checkpoint {resume_from}; every "
                    "rank must see run.output_dir (a shared filesystem) to resume"
                )
        return resume_from

    def _starting_state(self, allow_config_change: bool) -> RunState:
        """The resumed checkpoint's state (its config checked against this one), or a fresh one;
        recorded in the run file."""
        cfg, resume_from = self.cfg, self.resume_from
        state, resumed = RunState(), None
        if resume_from is not None:
            saved = ck.read_json(resume_from / ck.STATE_FILE)
            saved_hash = saved.pop("config_hash", None)
            # Also under an unchanged hash: [hardware] is not in it, and its dtype must not change.
            saved_config = ck.read_json(resume_from / ck.RUN_CONFIG_JSON)["config"]
            changed = R.check_resume(cfg, saved_config, resume_from, allow_config_change, self.say)
            state = RunState.from_saved(saved, resume_from / ck.STATE_FILE)
            resumed = {
                "at": R.utc_now(),
                "step": state.step,
                "checkpoint": str(resume_from),
                "config_hash_before": saved_hash,
                "changed": changed,
                "ranks": self.ranks,
            }
            self.say(f"resuming from {resume_from} (step {state.step})")
        if not state.run_id:  # a fresh run, or a checkpoint from before run ids
            state.run_id, state.run_created_at = R.new_run_id(cfg["run"]["name"]), R.utc_now()
        if self.dist is not None:
            # A fresh run id is drawn on rank 0 only (it holds the time and a random tag).
            state.run_id, state.run_created_at = self.dist.bcast((state.run_id, state.run_created_at))
        if self.main_rank:
            R.write_run_file(self.out, cfg, state.run_id, state.run_created_at, resumed, ranks=self.ranks)
        return state

    def step(self) -> int:
        """One optimizer step and its bookkeeping, together or not at all; returns its number."""
        state, t, s = self.state, self.cfg["train"], self.cfg["scheduler"]
        step = state.step + 1
        lr = lr_at(
            step, self.cfg["optimizer"]["lr"], s["name"], s["warmup_steps"], self.max_steps, s["min_lr_ratio"]
        )
        self.opt.lr = lr
        micro = [self.stream.next() for _ in range(t["grad_accum"])]
        with sigint_deferred():
            t0 = time.perf_counter()
            if len(micro) == 1:
                stats = self.trainer.step(micro[0][0], labels=micro[0][1])
            else:
                stats = self.trainer.step([m[0] for m in micro], labels=[m[1] for m in micro])
            n_tok = sum(m[0].size for m in micro)
            self.window.add(n_tok, time.perf_counter() - t0)
            self.total.add(n_tok, time.perf_counter() - t0)
            state.step, state.data_position = step, self.stream.position
            state.tokens_seen += n_tok
            loss = float(stats.loss)
            if not math.isfinite(loss):
                raise UserError(f"training diverged at step {step} (loss {loss}); lower optimizer.lr")
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
            aux = {name: float(v) for name, v in stats.aux.items()}
            self.bar.update(step, loss, lr, self.window.rate, aux, self.model.device_memory())
            if step % t["log_every"] == 0 or step == self.max_steps:
                self.metrics.write(
                    {
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(stats.grad_norm),
                        "tokens_per_s": self.window.rate,
                        "rss_mib": round(rss_mib(), 1),
                        "peak_rss_mib": round(peak_rss_mib(), 1),
                        "tokens_seen": state.tokens_seen,
                        "epoch": self.stream.epoch,
                        **{f"aux/{name}": v for name, v in aux.items()},
                    }
                )
                self.window = Throughput()
        return step

    def evaluate(self, step: int) -> None:
        """Validation loss and samples; keeps the best checkpoint and stops early when asked."""
        state, patience = self.state, self.cfg["train"]["early_stopping_patience"]
        val_loss, val_ppl = evaluate(self.trainer, self.valid_batches)
        self.metrics.write({"step": step, "val_loss": val_loss, "val_ppl": val_ppl})
        if self.main_rank:
            self.bar.write(f"step {step}: val_loss {val_loss:.4f}  val_ppl {val_ppl:.2f}")
            samples = sample_continuations(self.model, self.tokenizer, self.prompts, self.gen_opts)
            for p, text in zip(self.prompts, samples, strict=True):
                self.bar.write(f"  sample: {p!r} -> {text!r}")
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss, state.best_step, state.evals_since_best = val_loss, step, 0
            if patience and self.main_rank:
                self.save(self.out / "best")
            return
        state.evals_since_best += 1
        if patience and state.evals_since_best >= patience:
            state.stopped_early = True
            self.bar.write(
                f"early stopping at step {step}: no improvement for {state.evals_since_best} "
                f"evaluations; best val_loss {state.best_val_loss:.4f} at step {state.best_step}"
            )

    def save(self, dest: Path) -> Path:
        return save_checkpoint(
            dest, self.cfg, self.model, self.trainer, self.tokenizer, self.state, self.meta
        )

    def save_step(self, step: int) -> None:
        """The step's checkpoint, then the oldest pruned beyond train.keep_last."""
        if not self.main_rank:
            return
        self.save(self.ckpt_root / ck.step_dir_name(step))
        self.saved_step = step
        with sigint_deferred():  # or Ctrl-C could leave a half-deleted step folder behind
            ck.prune(self.ckpt_root, self.cfg["train"]["keep_last"])

    def interrupted(self) -> TrainingInterrupted:
        """After Ctrl-C: the last finished step saved (see sigint_deferred), and what to tell the user.
        A step's pending evaluation is not redone on resume; training itself continues exactly."""
        step = self.state.step
        where = self.ckpt_root / ck.step_dir_name(step)
        if step == self.start_step:
            where, saved = self.resume_from, False
        elif not self.main_rank:
            saved = False
        else:
            saved = True
            if self.saved_step != step:
                self.save(where)
            # Pruning keeps the highest steps: with a newer one left by an earlier attempt, it would
            # remove the checkpoint just saved.
            if ck.latest_checkpoint(self.ckpt_root) == where:
                ck.prune(self.ckpt_root, self.cfg["train"]["keep_last"])
        return training_interrupted(self.cfg, step, where, saved)

    def finish(self) -> TrainResult:
        """Registers a finished run's model (the best one when it stopped early) and plots its loss."""
        state, out = self.state, self.out
        finished = state.step >= self.max_steps or state.stopped_early
        best = out / "best"
        final_dir = best if (state.stopped_early and best.exists()) else ck.latest_checkpoint(self.ckpt_root)
        registered = None
        if finished and final_dir is not None and self.main_rank:
            registered = register_run(self.cfg, final_dir, self.meta)
            if (out / "metrics.jsonl").exists():
                png = plot_loss(out / "metrics.jsonl", out / "loss.png", title=self.cfg["run"]["name"])
                self.say(f"loss curve: {png}")
        return TrainResult(
            output_dir=out,
            final_dir=final_dir,
            steps=state.step,
            first_loss=self.first_loss,
            last_loss=self.last_loss,
            best_val_loss=state.best_val_loss,
            stopped_early=state.stopped_early,
            tokens_per_s=self.total.rate,
            registered_as=registered,
        )


@dataclass
class Throughput:
    """Tokens over the seconds spent in steps."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def check_step_memory(cfg: Config, model) -> None:
    """Refuses a batch_size or grad_accum whose step cannot fit in memory, before any batch is built:
    the grad_accum micro-batches of ids are held at once, and each micro-batch's activations
    (logits and, per layer, a few hidden-sized tensors) while it runs."""
    from metalcandle.generate import physical_memory

    t, seq = cfg["train"], cfg["data"]["seq_len"]
    c = model.config
    hidden = c.get("hidden_size") or c.get("d_model") or c.get("n_embd") or 1
    per_row = seq * 4 * (2 * model.vocab_size + 16 * model.num_layers * hidden)
    limit = physical_memory()
    where = f"{cfg.source}: " if cfg.source else ""
    gib = limit / 2**30
    if t["batch_size"] * per_row > limit:
        raise UserError(
            f"{where}train.batch_size = {t['batch_size']} needs about "
            f"{t['batch_size'] * per_row / 2**30:.1f} GiB of activations per micro-batch at seq_len "
            f"{seq}, more than this machine's {gib:.1f} GiB"
        )
    windows = t["batch_size"] * t["grad_accum"]
    if windows * seq * 16 > limit:
        raise UserError(
            f"{where}train.grad_accum = {t['grad_accum']} holds {windows:,} windows per step, more than "
            f"this machine's {gib:.1f} GiB can hold"
        )


def register_run(cfg: Config, final_dir: Path, meta: dict) -> str:
    """Copies the finished model (weights, tokenizer, metadata; not the optimizer state) into the
    models directory and records it, with its lineage, in the registry."""
    registry = Registry(cfg.models_dir)
    name = cfg["run"]["name"]
    dest = registry.dir / name

    def write(tmp: Path):
        for p in final_dir.iterdir():
            if p.is_file() and p.name not in (ck.STATE_FILE,):
                shutil.copy2(p, tmp / p.name)

    ck.write_atomic_dir(dest, write)
    registry.register(
        {
            "model_name": name,
            "model_id": meta["model_id"],
            "architecture_type": meta["architecture_type"],
            "source": f"trained:{cfg.output_dir}",
            "path": str(dest),
            "fine_tuned_from": meta["fine_tuned_from"],
            "license": meta["license"],
            "training": meta["training"],
        },
        overwrite=True,
    )
    return name


def evaluate_checkpoint(cfg: Config, checkpoint: Path | None) -> dict:
    """`metalcandle eval`: validation loss and perplexity of a checkpoint (default: the run's newest,
    else the [model] base)."""
    import metalcandle as mc

    device = use_hardware(cfg)
    base = resolve_base(cfg)
    if checkpoint is None:
        checkpoint = ck.latest_checkpoint(cfg.output_dir / "checkpoints")
    if checkpoint is None and base is None:
        raise untrained_error(cfg)
    folder = checkpoint if checkpoint is not None else base.path
    model = load_model_dir(folder, device, cfg["hardware"]["dtype"], cfg.models_dir)
    tokenizer = load_folder_tokenizer(folder, cfg.models_dir)
    enable_qat(cfg, model)  # a QAT run is scored as the quantized model it trains for
    data = load_datasets(cfg, tokenizer)
    trainer = mc.Trainer(model, None)  # evaluation takes no step
    batches = D.eval_batches(data.valid, cfg["train"]["batch_size"], cfg["train"]["eval_batches"])
    loss, ppl = evaluate(trainer, batches)
    return {
        "model": str(folder),
        "val_loss": loss,
        "val_ppl": ppl,
        "windows": sum(len(b[0]) for b in batches),
    }

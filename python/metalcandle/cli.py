"""The `metalcandle` command line (also `python -m metalcandle`).

Every user-facing failure becomes one line on stderr and exit code 2; `--debug` shows the traceback.
Ctrl-C is one line and exit code 130 (`train` saves a checkpoint first and says how to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from metalcandle.errors import TrainingInterrupted, UserError
from metalcandle.presets import PRESETS

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block, then the error)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def _add_set(p):
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax; repeatable), e.g. --set train.max_steps=100",
    )


def build_parser() -> Parser:
    parser = Parser(
        prog="metalcandle",
        description="Train small decoder-only transformers from scratch, or fine-tune pretrained ones "
        "with LoRA, from one TOML config.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("train", help="train (or resume) the run a config describes")
    p.add_argument("config", metavar="CFG", help="TOML config (see `metalcandle init`)")
    _add_set(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train on N data-parallel processes on this machine (runs mpiexec -n N for you)",
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config differs from the checkpoint's in keys that change the "
        "run (hooks, data, optimizer, ...); without it such a resume is refused",
    )

    p = sub.add_parser(
        "compare",
        help="config differences and loss curves of two runs",
        description="Prints the run ids, config hashes and every resolved-config key in which two runs "
        "differ (key: A -> B), and plots both runs' training and validation loss in one PNG.",
    )
    p.add_argument("runs", nargs=2, metavar="RUN_DIR", help="a run's output folder (run.output_dir)")
    p.add_argument("--out", metavar="PNG", help="where to write the plot (default: ./compare.png)")

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    p.add_argument("config", metavar="CFG")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder (default: the run's newest)")
    _add_set(p)

    from metalcandle.quantize import FORMATS

    p = sub.add_parser(
        "quantize",
        help="quantize a checkpoint or the [model] base into a GGUF file",
        description="Quantizes every linear layer and the token embedding (matrices whose input size "
        "the format cannot take stay float) and writes DIR/model.gguf with the tokenizer and config "
        "embedded, plus DIR/tokenizer.json and DIR/config.json. A LoRA checkpoint is merged first.",
    )
    p.add_argument("config", metavar="CFG")
    p.add_argument(
        "--format",
        default=None,
        type=str.lower,
        choices=FORMATS,
        metavar="FORMAT",
        help=f"block format: {', '.join(FORMATS)} (default: the config's [quantization] qat, else q8_0)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint or model folder (default: the run's final checkpoint, else the [model] base)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="GLOB",
        help="keep matching modules in float (repeatable; * matches anything), e.g. lm_head",
    )
    _add_set(p)

    p = sub.add_parser("import-model", help="add a Hugging Face model folder (or hub id) to the registry")
    p.add_argument(
        "source", metavar="SOURCE", help="local Hugging Face folder, or a hub id like Qwen/Qwen2.5-0.5B"
    )
    p.add_argument("--name", help="registry name (default: the folder or repository name)")
    p.add_argument("--models-dir", help="registry folder (default: $METALCANDLE_MODELS_DIR or ./models)")
    p.add_argument("--link", action="store_true", help="symlink a local folder instead of copying it")

    p = sub.add_parser("models", help="list the registry (`models show NAME` for one entry)")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--models-dir", help="registry folder (default: $METALCANDLE_MODELS_DIR or ./models)")

    sub.add_parser("env", help="the build's features, the devices found, threads and SIMD level")

    p = sub.add_parser("init", help="print a commented example config")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument(
        "--from-scratch", action="store_true", help="character-level model from scratch (default)"
    )
    kind.add_argument("--lora", action="store_true", help="LoRA fine-tune of an imported model")
    kind.add_argument(
        "--preset", choices=sorted(PRESETS), help="from scratch with a named model shape (e.g. gpt2-small)"
    )

    for name, helptext in (("chat", "interactive chat"), ("generate", "complete one prompt")):
        p = sub.add_parser(name, help=f"{helptext} with a base model, a checkpoint, or base + LoRA adapter")
        p.add_argument("config", metavar="CFG")
        if name == "generate":
            p.add_argument("prompt", metavar="PROMPT")
        p.add_argument(
            "--checkpoint",
            metavar="DIR",
            help="checkpoint or model folder (a LoRA checkpoint loads onto its base); "
            "default: the [model] base, or the run's newest checkpoint when training from scratch",
        )
        p.add_argument(
            "--adapter", metavar="DIR", help="a PEFT LoRA adapter folder to put on the [model] base"
        )
        if name == "chat":
            p.add_argument("--system", metavar="TEXT", help="system prompt")
        _add_set(p)
    return parser


# --- commands ---------------------------------------------------------------------------------------


def cmd_train(args) -> int:
    from metalcandle import distributed
    from metalcandle.config import load_config
    from metalcandle.train import train

    if args.nproc is not None and args.nproc > 1:
        return launch_ranks(args.nproc, [a for a in sys.argv[1:]])
    dist = distributed.init() if distributed.launched_by_mpi() else None
    cfg = load_config(args.config, args.overrides)
    result = train(cfg, progress=not args.quiet, allow_config_change=args.allow_config_change, comm=dist)
    if dist is not None and not dist.is_main:
        return 0
    lines = [f"steps: {result.steps}"]
    if result.first_loss is not None:
        lines.append(f"train loss: {result.first_loss:.4f} -> {result.last_loss:.4f}")
    if result.best_val_loss is not None:
        lines.append(f"best val_loss: {result.best_val_loss:.4f}")
    lines.append(f"throughput: {result.tokens_per_s:,.0f} tokens/s")
    if result.final_dir is not None:
        lines.append(f"final checkpoint: {result.final_dir}")
    if result.registered_as:
        lines.append(f"registered as: {result.registered_as}")
    print("\n".join(lines))
    return 0


def launch_ranks(nproc: int, argv: list[str]) -> int:
    """`metalcandle train ... --nproc N`: the same command under `mpiexec -n N` on this machine,
    each rank with its share of the cores."""
    import subprocess

    mpiexec = shutil.which(
        "mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    )
    if mpiexec is None:
        raise UserError('--nproc needs mpiexec (pip install "metalcandle[mpi]")')
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    env = dict(os.environ)
    from metalcandle import devices

    if not devices.USER_SET_THREADS:
        # The ranks share the cores, whatever this process pinned for itself.
        env["RAYON_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    cmd = [mpiexec, "-n", str(nproc), sys.executable, "-m", "metalcandle", *rest]
    return subprocess.call(cmd, env=env)


def cmd_eval(args) -> int:
    from metalcandle.config import load_config
    from metalcandle.train import evaluate_checkpoint

    cfg = load_config(args.config, args.overrides)
    ckpt = Path(args.checkpoint).absolute() if args.checkpoint else None
    if ckpt is not None and not ckpt.is_dir():
        raise UserError(f"--checkpoint: {ckpt} is not a folder")
    r = evaluate_checkpoint(cfg, ckpt)
    print(f"{r['model']}: val_loss {r['val_loss']:.4f}  val_ppl {r['val_ppl']:.3f}  ({r['windows']} windows)")
    return 0


def cmd_quantize(args) -> int:
    from metalcandle.config import load_config
    from metalcandle.quantize import quantize_run

    cfg = load_config(args.config, args.overrides)
    qat = cfg["quantization"]
    fmt = args.format or (qat["qat"] if qat else "q8_0")
    skip = list(args.skip) + (qat["skip"] if qat and args.format is None else [])
    print("\n".join(quantize_run(cfg, fmt, Path(args.out), args.checkpoint, skip)))
    return 0


def cmd_compare(args) -> int:
    from metalcandle.runs import compare

    lines, _ = compare(args.runs[0], args.runs[1], args.out)
    print("\n".join(lines))
    return 0


def _hub_download(repo_id: str) -> Path:
    """Downloads a hub repository's model files; any failure is a one-line error."""
    hint = f"could not fetch '{repo_id}' from the Hugging Face Hub"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{hint}: offline (HF_HUB_OFFLINE is set); pass a local model folder instead")
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "README.md"],
        )
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{hint} ({msg}); pass a local model folder instead") from None
    return Path(path)


def cmd_import_model(args) -> int:
    import metalcandle as mc
    from metalcandle.adapters import architecture_type_of
    from metalcandle.checkpoint import write_atomic_dir
    from metalcandle.registry import Registry, check_name, read_license

    src = Path(args.source).expanduser()
    if src.exists():
        if not (src / "config.json").is_file():
            raise UserError(f"{src} is not a Hugging Face model folder (no config.json)")
        folder, source = src.absolute(), f"local:{src.absolute()}"
        default_name = folder.name
    elif "/" in args.source and not args.source.startswith((".", "/", "~")) and args.source.count("/") == 1:
        folder, source = _hub_download(args.source), f"hub:{args.source}"
        default_name = args.source.split("/")[-1]
    else:
        raise UserError(f"model folder not found: {src}")
    if args.name is not None:
        check_name(args.name, "--name")
    else:
        check_name(
            default_name,
            f"the model name {default_name!r} taken from {args.source} (choose one with --name):",
        )
    name = args.name or default_name
    registry = Registry(args.models_dir or None)
    if name in registry:
        raise UserError(f"model '{name}' is already in the registry {registry.file}; choose another --name")
    model = mc.load_model(folder)  # checks every tensor before anything is copied
    dest = registry.dir / name
    if args.link:
        if source.startswith("hub:"):
            raise UserError("--link only works with a local folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            raise UserError(f"{dest} already exists")
        dest.symlink_to(folder, target_is_directory=True)
    else:
        write_atomic_dir(dest, lambda tmp: shutil.copytree(folder, tmp, dirs_exist_ok=True, symlinks=False))
    entry = registry.register(
        {
            "model_name": name,
            "model_id": args.source if source.startswith("hub:") else None,
            "architecture_type": architecture_type_of(model),
            "source": source,
            "path": str(dest),
            "fine_tuned_from": None,
            "license": read_license(folder),
        }
    )
    print(f"imported {name} ({entry['architecture_type']}, {model.num_parameters():,} parameters) -> {dest}")
    return 0


def cmd_models(args) -> int:
    from metalcandle.registry import Registry

    registry = Registry(args.models_dir or None)
    if args.action == "show" or (args.action == "list" and args.name):
        if not args.name:
            raise UserError("models show: give a model NAME")
        entry = dict(registry.get(args.name))
        entry["lineage"] = registry.lineage(args.name)
        print(json.dumps(entry, indent=2, sort_keys=True))
        return 0
    entries = registry.entries()
    if not entries:
        print(
            f"no models in {registry.file} (add one with `metalcandle import-model` or `metalcandle train`)"
        )
        return 0
    rows = [("NAME", "ARCHITECTURE", "SOURCE", "LINEAGE", "CREATED")]
    for e in entries:
        rows.append(
            (
                e["model_name"],
                e.get("architecture_type") or "?",
                e.get("source") or "",
                " <- ".join(registry.lineage(e["model_name"])),
                (e.get("created_at") or "")[:19],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_env(args) -> int:
    from metalcandle.devices import describe

    print(describe())
    return 0


def cmd_init(args) -> int:
    from metalcandle.templates import FROM_SCRATCH, LORA, from_preset

    if args.preset:
        sys.stdout.write(from_preset(args.preset))
    else:
        sys.stdout.write(LORA if args.lora else FROM_SCRATCH)
    return 0


def load_for_inference(args):
    """(cfg, model, tokenizer, what) for chat/generate: --checkpoint, else --adapter on the base,
    else the base (or, from scratch, the run's newest checkpoint)."""
    from metalcandle.checkpoint import latest_checkpoint
    from metalcandle.config import load_config
    from metalcandle.loading import (
        load_folder_tokenizer,
        load_model_dir,
        resolve_base,
        untrained_error,
        use_hardware,
    )

    cfg = load_config(args.config, args.overrides)
    device, dtype, models = use_hardware(cfg), cfg["hardware"]["dtype"], cfg.models_dir

    def from_folder(folder: Path):
        model = load_model_dir(folder, device, dtype, models)
        return cfg, model, load_folder_tokenizer(folder, models), str(folder)

    if args.checkpoint:
        folder = Path(args.checkpoint).absolute()
        if not folder.is_dir():
            raise UserError(f"--checkpoint: {folder} is not a folder")
        return from_folder(folder)
    base = resolve_base(cfg)
    if base is None:
        folder = latest_checkpoint(cfg.output_dir / "checkpoints")
        if folder is None:
            raise untrained_error(cfg)
        return from_folder(folder)
    model = load_model_dir(base.path, device, dtype, models)
    what = str(base.path)
    if args.adapter:
        adapter = Path(args.adapter).absolute()
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"--adapter: {adapter} is not a LoRA adapter folder (no adapter_config.json)")
        model.load_adapter(adapter)
        what += f" + {adapter}"
    return cfg, model, load_folder_tokenizer(base.path, models), what


def cmd_chat(args) -> int:
    from metalcandle.chat import run_chat
    from metalcandle.generate import generation_options

    cfg, model, tokenizer, what = load_for_inference(args)
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"{what}: the tokenizer has no chat template; use `metalcandle generate CFG PROMPT`")
    print(f"model: {what}", file=sys.stderr)
    run_chat(
        model, tokenizer, generation_options(cfg["generate"]), system_prompt=args.system, output=sys.stdout
    )
    return 0


def cmd_generate(args) -> int:
    from metalcandle.chat import run_generate
    from metalcandle.generate import generation_options

    cfg, model, tokenizer, what = load_for_inference(args)
    print(f"model: {what}", file=sys.stderr)
    opts = generation_options(cfg["generate"])
    # A one-line note instead of generate's multi-line warning when the context is too short.
    room = model.max_position_embeddings - len(tokenizer.encode(args.prompt))
    if opts["max_new_tokens"] > room:
        print(
            f"note: the model's context allows {max(room, 0)} new tokens after this prompt", file=sys.stderr
        )
        opts["max_new_tokens"] = max(room, 0)
    run_generate(model, tokenizer, args.prompt, opts, output=sys.stdout)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "quantize": cmd_quantize,
    "import-model": cmd_import_model,
    "models": cmd_models,
    "init": cmd_init,
    "env": cmd_env,
    "chat": cmd_chat,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return COMMANDS[args.command](args)
    except KeyboardInterrupt as e:
        # 130 = 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C.
        print(str(e) if isinstance(e, TrainingInterrupted) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, UserError):
            print(f"error: {e}", file=sys.stderr)
        else:
            # Errors from the core (bad checkpoint files, shapes) already name what is wrong.
            detail = " ".join(str(e).split()) or type(e).__name__
            print(
                f"error: {type(e).__name__}: {detail}" + ("" if debug else " (--debug for the traceback)"),
                file=sys.stderr,
            )
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

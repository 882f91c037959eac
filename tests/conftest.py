import importlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# The repository's own reference fixtures (see tests/fixtures/README.md); METALCANDLE_FIXTURES
# points the tests at another copy, e.g. freshly regenerated ones.
FIXTURES = Path(
    os.environ.get("METALCANDLE_FIXTURES", Path(__file__).resolve().parent / "fixtures")
).resolve()
MODELS = ["tiny-qwen2", "tiny-llama", "tiny-gpt2", "tiny-mistral-sw", "tiny-phi3"]
# Qwen2 checkpoints whose layers differ in their attention window (tests/test_layer_types.py).
LAYERED_MODELS = ["tiny-qwen2-layer-types", "tiny-qwen2-max-window"]

# Tolerances from the fixtures' README.
ATOL_FORWARD = 5e-5

# The smallest valid run config (a from-scratch model on corpus.txt), for config and run tests.
MINIMAL_CONFIG = """
[run]
name = "t"
[model.spec]
d_model = 32
n_layers = 2
n_heads = 4
[data]
train = ["corpus.txt"]
seq_len = 32
[train]
max_steps = 5
"""


def assert_cached_steps_match(model, g):
    """Decodes the recorded greedy tokens one at a time through a KV cache; each step's logits must
    match the recorded ones. Returns the cache."""
    cache = model._core.new_cache()
    step = g["gen_prompt"]
    for s in range(g["gen_logits"].shape[0]):
        logits = model._core.forward_cached(np.ascontiguousarray(step), cache)
        np.testing.assert_allclose(logits, g["gen_logits"][s], atol=ATOL_FORWARD, rtol=0)
        step = g["gen_output"][:, 8 + s : 9 + s]
    return cache


# A tiny character-level model trained from scratch on corpus.txt, for the training loop and CLI
# tests: a few steps, with evaluation, sampling, checkpoints and pruning along the way.
SCRATCH_TOML = """
[run]
name = "{name}"
output_dir = "{out}"
models_dir = "{models}"
seed = 1

[model.spec]
d_model = 32
n_layers = 2
n_heads = 4
d_ff = 64
max_seq_len = 32

[data]
train = ["corpus.txt"]
valid_fraction = 0.1
seq_len = 32

[optimizer]
lr = 3e-3

[scheduler]
name = "cosine"
warmup_steps = 3

[train]
max_steps = {steps}
batch_size = 4
eval_every = 5
eval_batches = 2
save_every = 5
keep_last = 2
log_every = 1

[generate]
max_new_tokens = 8
temperature = 0.8
top_k = 10
"""

# A pretrained model folder ({base}) as the run's model, with greedy generation: for the commands that
# load a model from a config without training it (generate, chat, quantize).
PRETRAINED_TOML = """
[run]
name = "{name}"
output_dir = "{out}"
models_dir = "{models}"

[model]
path = "{base}"

[data]
train = ["corpus.txt"]
seq_len = 32

[train]
max_steps = {steps}

[generate]
max_new_tokens = 5
temperature = 0
"""


def write_config(
    path: Path, name: str, out: Path, models: Path, steps: int = 12, template=SCRATCH_TOML, **fields
) -> Path:
    """Writes a run config from `template` (placeholders {name}, {out}, {models}, {steps} and any
    `fields`, such as {base}) to `path`."""
    path.write_text(template.format(name=name, out=out, models=models, steps=steps, **fields))
    return path


def write_corpus(folder: Path, chars: int = 6000) -> Path:
    """The start of the fixtures' corpus.txt, as `folder`/corpus.txt: enough text for a few steps."""
    (folder / "corpus.txt").write_text((FIXTURES / "corpus.txt").read_text()[:chars])
    return folder


def run_cli(capsys, *argv):
    """`metalcandle ARGV` in this process: (exit code, stdout, stderr)."""
    from metalcandle.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def read_metrics(out: Path) -> list[dict]:
    """Every line of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def split_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    """A run folder's metrics.jsonl as (training lines, evaluation lines)."""
    rows = read_metrics(out)
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def weights(model) -> dict[str, np.ndarray]:
    """A snapshot of every parameter of `model`, by name."""
    return {n: model.get_parameter(n) for n in model.parameter_names()}


class ScriptedCore:
    """A stand-in for the Rust core whose model emits a fixed token sequence, for streaming tests."""

    max_position_embeddings = 512

    def __init__(self, script, vocab):
        self.script, self.vocab, self.calls = script, vocab, 0

    def new_cache(self):
        self.calls = 0
        return SimpleNamespace(seq_len=0)

    def forward_cached(self, ids, cache, mask=None, positions=None):
        logits = np.zeros((ids.shape[0], self.vocab), dtype=np.float32)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        cache.seq_len += ids.shape[1]
        return logits


class ScriptedModel:
    max_position_embeddings = ScriptedCore.max_position_embeddings

    def __init__(self, script, vocab):
        self._core = ScriptedCore(script, vocab)
        self.config = {}


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"reference fixtures not found at {FIXTURES} (set METALCANDLE_FIXTURES)")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


# Interop tests (marker `interop`) run against the real clients: torch, transformers, peft and
# llama.cpp. Without them they skip; the interop stage of .ci/run sets METALCANDLE_INTEROP=1, and
# there a missing client, or any skipped interop test, is a failure.
INTEROP_REQUIRED = os.environ.get("METALCANDLE_INTEROP") == "1"


def require(module: str):
    """Imports an interop client: skips without it, fails when METALCANDLE_INTEROP=1."""
    if INTEROP_REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} not installed (interop test)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    skipped = report.skipped and not hasattr(report, "wasxfail")  # an expected failure is no skip
    if INTEROP_REQUIRED and skipped and item.get_closest_marker("interop"):
        report.outcome = "failed"
        report.longrepr = f"METALCANDLE_INTEROP=1 but the interop test was skipped: {report.longrepr}"


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A scratch folder holding corpus.txt, for run configs written there."""
    return write_corpus(tmp_path)

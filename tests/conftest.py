import os
from pathlib import Path

import pytest

FIXTURES = Path(
    os.environ.get("METALCANDLE_FIXTURES", Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures")
).resolve()
MODELS = ["tiny-qwen2", "tiny-llama", "tiny-gpt2", "tiny-mistral-sw"]

# Tolerances from the fixtures' README.
ATOL_FORWARD = 5e-5

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


def write_config(
    path: Path, name: str, out: Path, models: Path, steps: int = 12, template=SCRATCH_TOML
) -> Path:
    """Writes a run config from `template` (placeholders {name}, {out}, {models}, {steps}) to `path`."""
    path.write_text(template.format(name=name, out=out, models=models, steps=steps))
    return path


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"reference fixtures not found at {FIXTURES} (set METALCANDLE_FIXTURES)")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES

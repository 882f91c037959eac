import os
from pathlib import Path

import pytest

FIXTURES = Path(
    os.environ.get("METALCANDLE_FIXTURES", Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures")
).resolve()
MODELS = ["tiny-qwen2", "tiny-llama", "tiny-gpt2", "tiny-mistral-sw"]

# Tolerances from the fixtures' README.
ATOL_FORWARD = 5e-5


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"reference fixtures not found at {FIXTURES} (set METALCANDLE_FIXTURES)")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES

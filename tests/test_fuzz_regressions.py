"""Replays the fuzzers' crash corpus (fuzz/regressions/TARGET/*, each input that once broke the
contract in fuzz/targets.py) and every target's seeds: each must now load or raise a documented
error naming its file."""

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import targets  # noqa: E402

CASES = sorted((p.parent.name, p) for p in (FUZZ / "regressions").glob("*/*") if p.is_file())


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_crash_input_now_meets_the_contract(target, path):
    targets.TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_seeds_meet_the_contract(target):
    for seed in targets.seeds(target):
        targets.TARGETS[target](seed)

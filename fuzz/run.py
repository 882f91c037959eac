"""Runs one fuzz target under atheris (coverage-guided; instruments the package's Python code, the
Rust readers run natively underneath):

    python fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR]

The fixtures' seeds are written to the corpus folder (default
fuzz/corpus/TARGET, not committed). Crashes land as crash-* files; move each into
fuzz/regressions/TARGET/ once fixed, where tests/test_fuzz_regressions.py replays it.
"""

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["metalcandle"]):
    import targets

HERE = Path(__file__).resolve().parent


def main() -> None:
    name = sys.argv[1]
    fn = targets.TARGETS[name]
    dirs = [a for a in sys.argv[2:] if not a.startswith("-")]
    seed_dir = Path(dirs[0]) if dirs else HERE / "corpus" / name
    seed_dir.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(targets.seeds(name)):
        (seed_dir / f"seed-{i}").write_bytes(s)
    args = [sys.argv[0], *sys.argv[2:]] + ([] if dirs else [str(seed_dir)])
    atheris.Setup(args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes a check-only copy of candle-kernels: the same Rust API, no build script.

candle-core's CUDA backend needs only candle-kernels' Rust side to type-check: the PTX modules
(`&'static str` constants) and the `extern "C"` declarations of the static kernels. The real
build script compiles every kernel with nvcc, which is most of the CUDA build's time. The copy
is made afresh, on every run, from the crate that Cargo.lock pins, so it cannot drift from the
real one: its Rust sources are the real ones, with each file they read from the build script's
OUT_DIR replaced by the crate's shipped copy of it (the PTX list) or by an empty string (the PTX
itself). An OUT_DIR read of another shape stops this script. What the real build script tells
the compiler besides that (today: link flags only) is left out; code behind a cfg it began to
set would be checked as if unset.

Usage: stub_kernels.py DEST   prints the `cargo --config` value that puts the copy in the graph.
The check re-resolves the dependency graph and cargo writes that into Cargo.lock: callers keep
the real lockfile and put it back.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

NAME = "candle-kernels"
OUT_DIR_FILE = r'concat!\(\s*env!\(\s*"OUT_DIR"\s*\)\s*,\s*"/([^"]+)"\s*\)'


def resolved(*args: str) -> list[Path]:
    # Only the cuda feature pulls candle-kernels into the graph.
    meta = json.loads(
        subprocess.run(
            [
                "cargo",
                "metadata",
                "-q",
                "--format-version",
                "1",
                "--features",
                "metalcandle-core/cuda",
                *args,
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
    )
    return [Path(p["manifest_path"]).parent for p in meta["packages"] if p["name"] == NAME]


def real_crate() -> Path:
    found = resolved("--locked")
    if len(found) != 1:
        sys.exit(f"expected one {NAME} in the lockfile, found {len(found)}")
    return found[0]


def manifest(text: str) -> str:
    # Line-based, on cargo's normalized manifest (one key a line, one table a header): drops
    # the build script and its dependencies, keeps the version and features candle-core sees.
    out, table = [], ""
    for line in text.splitlines():
        header = re.match(r"\s*\[+([^\]]+)\]+\s*$", line)
        if header:
            table = header.group(1).strip()
        if "build-dependencies" in table:
            continue
        if table == "package" and re.match(r"\s*build\s*=", line):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def rewrite(path: Path, text: str) -> str:
    def include(m: re.Match) -> str:
        # Generated Rust source. The crate ships a file of that name beside the one including it
        # (src/ptx.rs: the PTX list, in the form cudaforge generates it), whose own OUT_DIR reads
        # are rewritten in turn.
        shipped = path.parent / m.group(1)
        if not shipped.is_file():
            sys.exit(f"{path.name} includes OUT_DIR/{m.group(1)}, which the crate does not ship")
        return f'include!("{m.group(1)}")'

    text = re.sub(r"include_str!\(\s*" + OUT_DIR_FILE + r"\s*\)", '""', text)
    text = re.sub(r"include_bytes!\(\s*" + OUT_DIR_FILE + r"\s*\)", 'b""', text)
    text = re.sub(r"include!\(\s*" + OUT_DIR_FILE + r"\s*\)", include, text)
    if "OUT_DIR" in text:
        sys.exit(f"{path} reads OUT_DIR in a way this copy does not know")
    return text


def write(path: Path, text: str) -> None:
    # Unchanged files keep their mtime: cargo fingerprints a path crate by it, and a rewrite
    # would re-check candle-core and everything above it on every run.
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    real, out = real_crate(), Path(sys.argv[1])
    files = {Path("Cargo.toml"): manifest((real / "Cargo.toml").read_text())}
    for rs in (real / "src").rglob("*.rs"):
        files[rs.relative_to(real)] = rewrite(rs, rs.read_text())
    for path in [p for p in out.rglob("*") if p.is_file()] if out.is_dir() else []:
        if path.relative_to(out) not in files:
            path.unlink()
    for rel, text in files.items():
        write(out / rel, text)
    # A patch whose version differs from the one candle-core asks for is ignored with a warning,
    # and the real crate, kernels and all, would be compiled instead. This resolution is the
    # check's own: it rewrites Cargo.lock the way the check will.
    used = resolved("--config", patch_config(out))
    if used != [out.resolve()]:
        sys.exit(f"{NAME} resolves to {used}, not to the copy in {out}")
    print(f"{NAME} without kernels, from {real}, in {out}", file=sys.stderr)
    print(patch_config(out))


def patch_config(out: Path) -> str:
    return f'patch.crates-io.{NAME}.path="{out.resolve()}"'


if __name__ == "__main__":
    main()

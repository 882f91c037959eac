"""Which device a run uses: "auto" takes a GPU when this build has its backend and one is present,
else the CPU (saying why in one line); a named device that cannot be opened is an error."""

from __future__ import annotations

import os
import sys

from metalcandle import _core
from metalcandle.errors import UserError

GPU_BACKENDS = ("cuda", "metal")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def resolve_device(name: str, say=_stderr) -> str:
    """The device to load the model onto for config value `name` ("auto", "cpu", "cuda", "metal")."""
    info = _core.build_info()
    if name == "cpu":
        return "cpu"
    if name in GPU_BACKENDS:
        if name not in info["features"]:
            built = ", ".join(info["features"]) or "cpu only"
            raise UserError(
                f'device "{name}" is not in this build (built with: {built});'
                f' rebuild with `pip install . --config-settings=build-args="--features {name}"`'
            )
        if not info[f"{name}_available"]:
            raise UserError(f'device "{name}" cannot be opened: {info[f"{name}_error"]}')
        return name
    if name != "auto":
        raise UserError(f'unknown device "{name}" (expected "auto", "cpu", "cuda" or "metal")')
    for backend in GPU_BACKENDS:
        if backend in info["features"] and info[f"{backend}_available"]:
            return backend
    built = [b for b in GPU_BACKENDS if b in info["features"]]
    if built and say is not None:
        reasons = "; ".join(f"{b}: {info[f'{b}_error']}" for b in built)
        say(f"device auto: using the CPU ({reasons})")
    return "cpu"


# Whether the user chose the thread count (RAYON_NUM_THREADS set before import), as opposed to
# the default pinned by pin_default_threads().
USER_SET_THREADS = "RAYON_NUM_THREADS" in os.environ


def pin_default_threads() -> None:
    """Writes the core's default thread count into RAYON_NUM_THREADS when it is unset. The count
    is the same; the point is its cost: without the variable, the matrix-product library recounts
    the physical cores by reading and parsing /proc/cpuinfo at every product (about 60 us each, two
    per layer of every decoded token: 3 ms a token at 24 layers)."""
    if not USER_SET_THREADS:
        os.environ["RAYON_NUM_THREADS"] = str(_core.default_threads())


def apply_threads(threads: int) -> None:
    """Sets the CPU thread count (`hardware.threads`; 0 leaves the library's default). The core's
    threads follow RAYON_NUM_THREADS: its matrix products read it at every call, its thread pool
    when the process first computes in parallel, so this takes full effect before a process's
    first computation (as in every command line run) and, after one, on the matrix products only."""
    if threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(threads)


def describe() -> str:
    """`metalcandle env`: the build, the devices found, threads and SIMD level."""
    info = _core.build_info()
    lines = [
        f"metalcandle {info['version']} ({info['arch']})",
        f"build features: {', '.join(info['features']) or 'none (CPU only)'}",
    ]
    for b in GPU_BACKENDS:
        if b in info["features"]:
            state = "available" if info[f"{b}_available"] else f"not available ({info[f'{b}_error']})"
            lines.append(f"{b}: {state}")
    lines += [
        f"device auto -> {resolve_device('auto', say=None)}",
        f"threads: {info['threads']}",
        f"cpu simd: {', '.join(info['simd']) or 'none detected'}",
    ]
    return "\n".join(lines)

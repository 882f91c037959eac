"""The training progress bar (tqdm) and the memory it shows (resident, and the GPU's on CUDA)."""

from __future__ import annotations

import os
import sys


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; falls back to the peak from getrusage)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def peak_rss_mib() -> float:
    """The largest resident set size this process has had, in MiB (VmHWM; getrusage elsewhere)."""
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class Progress:
    """A tqdm bar over optimizer steps; quiet when `enabled` is false (tests, --quiet)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(
        self,
        step: int,
        loss: float,
        lr: float,
        tokens_per_s: float,
        aux: dict | None = None,
        device_memory: tuple[int, int] | None = None,
    ) -> None:
        """`aux`: auxiliary losses by name ("z_loss"), shown after the main loss. `device_memory`:
        (used, total) bytes of the GPU, shown after the process's resident memory."""
        if self.bar is None:
            return
        extra = "".join(f" {k}={v:.4g}" for k, v in (aux or {}).items())
        gpu = ""
        if device_memory is not None:
            used, total = device_memory
            gpu = f" gpu={used / 2**20:,.0f}/{total / 2**20:,.0f}MiB"
        self.bar.set_postfix_str(
            f"loss={loss:.4f}{extra} lr={lr:.2e} tok/s={tokens_per_s:,.0f} mem={rss_mib():,.0f}MiB{gpu}",
            refresh=False,
        )
        self.bar.update(step - self.bar.n)

    def write(self, text: str) -> None:
        """A log line that does not break the bar."""
        if self.bar is None:
            print(text, file=sys.stderr)
        else:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Data-parallel training over MPI (mpi4py): N processes, on one machine or many, train the model
one process trains. Each rank runs its slice of every global batch; one all-reduce per step sums
the gradients (a flat buffer) before clipping and the optimizer step, which then run identically
on every rank. Launch with `mpiexec -n N metalcandle train cfg.toml` (or `--nproc N`).
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from metalcandle.errors import UserError

INSTALL_HINT = 'pip install "metalcandle[mpi]"'


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UserError(f"distributed training needs mpi4py and an MPI ({INSTALL_HINT}): {e}") from None
    return MPI


@dataclass
class Distributed:
    """One rank's view of the job: its rank, the number of ranks, and the communicator."""

    rank: int
    size: int
    comm: Any

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def allreduce(self, array: np.ndarray) -> None:
        """Sums a contiguous numpy array over the ranks, in place."""
        self.comm.Allreduce(_mpi().IN_PLACE, array, op=_mpi().SUM)

    def sum(self, values) -> list[float]:
        a = np.asarray(values, dtype=np.float64).copy()
        self.allreduce(a)
        return a.tolist()

    def bcast(self, obj):
        """A picklable object from rank 0."""
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def broadcast_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's arrays (float32) on every rank, in one broadcast of one flat buffer."""
        names = sorted(arrays)
        flat = np.concatenate([np.ascontiguousarray(arrays[n], dtype=np.float32).ravel() for n in names])
        self.comm.Bcast(flat, root=0)
        out, offset = {}, 0
        for n in names:
            shape = arrays[n].shape
            size = int(np.prod(shape))
            out[n] = flat[offset : offset + size].reshape(shape)
            offset += size
        return out

    def abort(self, error: BaseException) -> None:
        """Reports `error` as this rank's and ends the whole job: the other ranks may be waiting in
        an all-reduce this rank will never join, so a plain exit would leave them hanging."""
        detail = " ".join(str(error).split()) or type(error).__name__
        print(f"error: rank {self.rank} of {self.size}: {type(error).__name__}: {detail}", file=sys.stderr)
        if os.environ.get("METALCANDLE_DEBUG"):
            traceback.print_exc()
        sys.stderr.flush()
        self.comm.Abort(1)

    @contextmanager
    def abort_on_error(self):
        """Turns an exception on this rank into an MPI abort of every rank (size > 1)."""
        try:
            yield self
        except BaseException as e:
            if self.size > 1:
                self.abort(e)
            raise


def launched_by_mpi() -> bool:
    """Whether this process was started by mpiexec/srun as one of several ranks."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    return False


def init(comm=None) -> Distributed:
    """The job's rank, size and communicator (default MPI.COMM_WORLD); needs mpi4py."""
    if comm is None:
        comm = _mpi().COMM_WORLD
    return Distributed(rank=comm.Get_rank(), size=comm.Get_size(), comm=comm)


def as_distributed(comm) -> Distributed | None:
    """`comm` as given to Trainer/train: None, a Distributed, or an mpi4py communicator."""
    if comm is None or isinstance(comm, Distributed):
        return comm
    return init(comm)


def rank_slice(batch_rows: int, dist: Distributed | None, what: str = "train.batch_size") -> slice:
    """The rows of each global batch that this rank trains on (rank r: the r-th of size equal
    parts), so N ranks together see exactly the windows one process sees."""
    if dist is None or dist.size == 1:
        return slice(0, batch_rows)
    if batch_rows % dist.size:
        raise UserError(
            f"{what} = {batch_rows} does not split over {dist.size} ranks: the batch is global, "
            f"so it must be a multiple of the number of ranks"
        )
    part = batch_rows // dist.size
    return slice(dist.rank * part, (dist.rank + 1) * part)


__all__ = ["Distributed", "init", "launched_by_mpi", "rank_slice"]

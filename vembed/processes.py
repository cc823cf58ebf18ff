"""This process' place among several started by ``torchrun`` or ``accelerate launch`` (or alone).

Embedding (``vembed embed``) and evaluation (``vembed eval retrieval``) share no gradients, only a
place in the job, a barrier and a few small exchanges: the processes meet over gloo (CPU or GPU
machines alike), using the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` the launcher sets.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

from vembed.errors import VembedError

# Processes wait for the slowest one at the end of a job: a large corpus can take hours.
BARRIER_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    barrier: Callable[[], None] = lambda: None

    def total(self, *values: int) -> list[int]:
        """The sums of ``values`` over every process."""
        if self.world_size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """``value`` of every process (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


@contextlib.contextmanager
def launched_processes() -> Iterator[Processes]:
    """Join the process group the launcher set up (``WORLD_SIZE`` > 1), or run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _refuse_mpi_without_world_size()
        yield Processes()
        return
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield Processes(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.barrier
        )
    finally:
        if created:
            dist.destroy_process_group()


# What mpirun / Intel MPI / MVAPICH set (``accelerate launch --cpu --mpirun_hostfile`` starts vembed
# through mpirun): the number of processes started, which torch.distributed does not read.
MPI_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _refuse_mpi_without_world_size() -> None:
    """Processes started by mpirun without ``WORLD_SIZE`` would each do the whole job, alone."""
    for name in MPI_SIZE_VARIABLES:
        size = os.environ.get(name, "1")
        if size.isdigit() and int(size) > 1:
            raise VembedError(
                f"started by MPI as one of {size} processes ({name}), but WORLD_SIZE is not set, so each "
                "would do the whole job alone; start vembed with torchrun, or with accelerate launch "
                "--multi_gpu --num_processes N (which sets RANK and WORLD_SIZE, also on CPU machines)"
            )


def device_for(device: str, local_rank: int, world_size: int) -> str:
    """``auto`` on a machine with several GPUs: this process' own GPU."""
    if device != "auto" or world_size == 1:
        return device
    import torch

    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else device

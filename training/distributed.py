"""Training under `torchrun`: one process per device, the LM wrapped in DistributedDataParallel.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address) for every process it
starts; a run started without it is one plain process with no process group, exactly as before.
Under torchrun every process joins one group (NCCL on GPUs, gloo on CPUs), also when there is
only one, so 1 process and N processes go through the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class LaunchError(Exception):
    """Options that do not fit the launch (a total batch that the processes cannot share evenly)."""


@dataclass(kw_only=True, frozen=True)
class Cluster:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" under torchrun; None for one plain process

    @property
    def main(self) -> bool:
        """Rank 0: the process that evaluates, logs, checkpoints the shared state and writes artifacts."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def rows(self, batch_size: int) -> slice:
        """This process's streams (rows) of the total batch: a contiguous share, rank by rank."""
        if batch_size % self.world_size:
            raise LaunchError(
                f"--batch-size {batch_size} (the total over all processes) must be a multiple of "
                f"the {self.world_size} processes"
            )
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def start(device: torch.device) -> tuple[Cluster, torch.device]:
    """Join torchrun's process group where launched by it; the device becomes cuda:LOCAL_RANK on GPUs."""
    if not launched_by_torchrun():
        return Cluster(), device
    rank, world_size, local_rank = (int(os.environ[n]) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"process {local_rank} of this node has no GPU of its own ({torch.cuda.device_count()} here): "
                "start at most one process per GPU, or pass --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Cluster(rank=rank, world_size=world_size, local_rank=local_rank, backend=dist.get_backend()), device


def finish(cluster: Cluster) -> None:
    if cluster.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sum_over_processes(cluster: Cluster, device: torch.device, values: list[float]) -> list[float]:
    """Element-wise sum of every process's `values` (the values themselves for one plain process)."""
    if not cluster.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def from_main(cluster: Cluster, device: torch.device, flag: bool) -> bool:
    """Rank 0's `flag`, on every process."""
    if not cluster.distributed:
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def barrier(cluster: Cluster) -> None:
    if cluster.distributed:
        dist.barrier()

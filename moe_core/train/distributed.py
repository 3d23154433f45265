"""Data parallelism with `torch.distributed` (gloo on CPU, nccl on GPU).

The trainer does not start processes: a launcher (torchrun, the orchestrator's worker group, or a test)
initialises the process group, and every worker calls `train_trial` with the same trial. Each
optimizer step's global batch is the same as for one worker (`batches.micro_batches` deals its
sequences out by rank), gradients are averaged by DDP (or, with `train.sharding: fsdp`, by
FSDP2: `fsdp.py`), and the MoE load counts that steer balancing are summed over workers, so W
workers reproduce one worker within float tolerance.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def init_from_env() -> None:
    """Join the process group a launcher such as `torchrun` describes in the environment
    (WORLD_SIZE > 1); nccl when CUDA is there, else gloo. Does nothing for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce sum (identity for one worker); returns `t`."""
        if self.enabled:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over workers (for logging)."""
        if not self.enabled or not values:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64)
        self.sum_(t)
        return dict(zip(values, (t / self.world_size).tolist()))

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DDP without buffer broadcasts: MoE layers keep per-worker load counters (summed
        explicitly) that a broadcast from rank 0 would overwrite. Gradients are views into DDP's
        all-reduce buckets, so DDP holds no second copy of them (moe_core/memory.py)."""
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        with warnings.catch_warnings():  # broadcast_buffers=False is still the way to skip init sync
            warnings.simplefilter("ignore", FutureWarning)
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, gradient_as_bucket_view=True)

"""A trial's own shape on a GPU cluster: how many workers (GPUs), how sharded, how placed.

The study's trials span four orders of magnitude of compute, so one shape per sweep wastes the
small ones (start-up paid on every GPU, data-parallel losses for nothing) and lets the largest
set the study's wall time. The planner gives each trial the shape this module picks:

1. **Fewest workers that fit**: the smallest worker count on the ladder 1, 2, 4, ... up to a
   node, then whole nodes (2, 3, ... nodes), whose memory plan (`moe_core.memory`, with
   `resources.sharding`) fits the GPU and over which the optimizer step's micro-batches split
   evenly.
2. **Raised while too long**: while its planned wall time (`Hardware.hours`, start-up and
   data-parallel efficiency included) exceeds `resources.max_hours`, the next rung, as long as
   the data-parallel efficiency stays at or above `resources.min_efficiency`.
3. **Placed as a gang**: a trial whose workers fit on one node gets one node (Ray's
   `STRICT_PACK`: its all-reduces stay on NVLink); a larger one whole nodes (`PACK`: the fewest
   nodes Ray can find, each worker's node filled first).

An explicit `resources.workers` is a fixed choice, as are CPU sweeps (their `workers`, default 1):
a CPU trial's memory is not planned and its node size is not known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe_core.memory import choose_sharding
from moe_core.trial import TrialConfig
from orchestrator.hardware import Hardware
from orchestrator.study import Infeasible

# Ray placement strategies (ray.util.placement_group): one node, or as few nodes as possible.
ONE_NODE, FEWEST_NODES = "STRICT_PACK", "PACK"
# Rungs of whole nodes tried at most (a trial over 64 nodes is not a sweep trial).
MAX_NODES = 64


@dataclass(frozen=True)
class TrialShape:
    """What one trial asks the cluster for."""

    workers: int  # data-parallel workers (Ray Train workers when more than one)
    gpus_per_worker: float
    cpus_per_worker: float
    workers_per_node: int  # how many such workers one node holds (for placement)

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def nodes(self) -> int:
        """Nodes the trial spans when packed."""
        return math.ceil(self.workers / self.workers_per_node)

    @property
    def placement(self) -> str:
        return ONE_NODE if self.workers <= self.workers_per_node else FEWEST_NODES

    def worker_bundle(self) -> dict[str, float]:
        """One worker's Ray resources (placement-group bundle)."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {})}

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "gpus": self.gpus, "gpus_per_worker": self.gpus_per_worker,
                "cpus_per_worker": self.cpus_per_worker, "nodes": self.nodes, "placement": self.placement}


def worker_ladder(per_node: int, limit: int = MAX_NODES) -> list[int]:
    """1, 2, 4, ... up to a node (and the node itself), then 2, 3, ... whole nodes."""
    rungs = [w for w in (2**i for i in range(32)) if w < per_node] + [per_node]
    return rungs + [per_node * n for n in range(2, limit + 1)]


@dataclass(frozen=True)
class ShapeChoice:
    shape: TrialShape
    sharding: str  # `none` or `fsdp`, as written into train.sharding
    memory: dict[str, Any] | None  # moe_core.memory estimate per GPU (None on CPUs)
    est_hours: float


def choose_shape(trial: TrialConfig, train_flops: float, resources: Any, hw: Hardware) -> ShapeChoice:
    """The shape of `trial` (a `ResourcesSpec` in `resources`); raises `Infeasible` with the
    reason when no allowed shape fits the GPU."""
    r = resources
    gpus = r.gpus > 0
    per_node = max(1, int(r.gpus_per_node // r.gpus)) if gpus else 1 << 30
    per_device = r.gpus if gpus else r.cpus

    def shape(workers: int) -> TrialShape:
        return TrialShape(workers, r.gpus, r.cpus, per_node)

    def hours(workers: int) -> float:
        return hw.hours(train_flops, workers, per_node, per_device)

    if not gpus or hw.memory_bytes is None:  # CPU trials: host memory, not planned
        workers = r.workers or 1
        return ShapeChoice(shape(workers), "none" if r.sharding == "auto" else r.sharding, None, hours(workers))

    device_bytes = int(hw.memory_bytes * min(1.0, r.gpus))

    def plan(workers: int) -> Any:
        return choose_sharding(trial.model, trial.train, workers=workers, mode=r.sharding, device_bytes=device_bytes,
                               checkpointing=trial.train.activation_checkpointing)

    if r.workers is not None:  # the sweep's fixed choice
        choice = plan(r.workers)
        if not choice.fits:
            raise Infeasible(f"{choice.reason} on {hw.name}")
        return ShapeChoice(shape(r.workers), choice.sharding, choice.estimate.to_dict(), hours(r.workers))

    ladder = [w for w in worker_ladder(per_node) if trial.accumulation_steps % w == 0]
    fitting, last = None, None
    for i, workers in enumerate(ladder):
        last = plan(workers)
        if last.fits:
            fitting = i
            break
    if fitting is None:
        why = last.reason if last is not None else f"{trial.accumulation_steps} micro-batches per step split over no worker count"
        raise Infeasible(f"{why} on {hw.name}")
    i, choice = fitting, last
    while hours(ladder[i]) > r.max_hours and i + 1 < len(ladder):
        bigger = ladder[i + 1]
        if hw.dp_efficiency(bigger, per_node) < r.min_efficiency:
            break
        i, choice = i + 1, plan(bigger)
    workers = ladder[i]
    return ShapeChoice(shape(workers), choice.sharding, choice.estimate.to_dict(), hours(workers))

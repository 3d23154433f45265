"""The wall time a queue of planned trials takes on a cluster: list scheduling on the plan's own
estimates, without running anything (`moe-sweep plan --gpus N`, and the model that
`bench/cluster_schedule.py` sets beside the real orchestrator's simulated run).

Whenever GPUs free up, the queue is walked in order and every trial that fits starts, later
ones filling gaps an earlier one cannot use, but only among the first `window` trials still
waiting (Tune requests that many placement groups at once: the orchestrator's look-ahead is 8,
Tune's default hundreds; None: no limit). A gang trial (its
`placement` STRICT_PACK) needs its GPUs on one node, a larger one whole free nodes; a trial
without gang placement takes free GPUs anywhere (Ray's default soft packing).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Job:
    hours: float
    gpus: int
    gang: bool = True  # one node when it fits one, else whole nodes
    group: int = 0  # jobs of group g start only after every job of group g - 1 ended (sweeps run one after another)


@dataclass(frozen=True)
class Schedule:
    makespan: float  # hours from the first start to the last end
    gpu_hours: float
    gpus: int
    longest: float

    @property
    def bound(self) -> float:
        """No schedule ends sooner: all the work spread evenly, or the longest trial."""
        return max(self.gpu_hours / self.gpus, self.longest)

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound if self.bound else float("nan")

    @property
    def utilisation(self) -> float:
        return self.gpu_hours / (self.makespan * self.gpus) if self.makespan else float("nan")


def queue_key(hours: float, gpus: float, node_gpus: float) -> tuple:
    """The orchestrator's queue order: trials of a whole node or more first (they start while
    the cluster is empty and then free whole nodes for each other, never waiting for narrow
    trials to drain one), then the rest; longest planned first within each, wider on ties."""
    return (gpus < node_gpus, -hours, -gpus)


def longest_first(jobs: Iterable[Job], node_gpus: float = 8) -> list[Job]:
    """`jobs` in the orchestrator's queue order (`queue_key`)."""
    return sorted(jobs, key=lambda j: queue_key(j.hours, j.gpus, node_gpus))


def simulate(jobs: Sequence[Job], nodes: int, gpus_per_node: int, window: int | None = 8) -> Schedule:
    """List-schedule `jobs` in their order on `nodes` x `gpus_per_node` GPUs."""
    for j in jobs:
        if j.gpus > nodes * gpus_per_node:
            raise ValueError(f"a trial of {j.gpus} GPUs cannot run on {nodes} x {gpus_per_node}")
    free = [gpus_per_node] * nodes
    running: list[tuple[float, int, list[tuple[int, int]]]] = []  # (end, seq, [(node, gpus)])
    groups = sorted({j.group for j in jobs})
    now, seq, end = 0.0, 0, 0.0
    for group in groups:
        queue = [j for j in jobs if j.group == group]
        while queue:
            left = []
            for i, j in enumerate(queue):
                if window is not None and len(left) >= window:  # past the look-ahead
                    left += queue[i:]
                    break
                taken = _place(j, free, gpus_per_node) if sum(free) else None
                if taken is None:
                    left.append(j)
                    continue
                for node, n in taken:
                    free[node] -= n
                heapq.heappush(running, (now + j.hours, seq, taken))
                seq += 1
            queue = left
            if not running:
                break
            now, _, taken = heapq.heappop(running)
            for node, n in taken:
                free[node] += n
            while running and running[0][0] <= now:  # everything ending at the same time
                _, _, more = heapq.heappop(running)
                for node, n in more:
                    free[node] += n
            end = max(end, now)
        while running:  # the group's stragglers, before the next group starts
            now, _, taken = heapq.heappop(running)
            for node, n in taken:
                free[node] += n
        end = max(end, now)
    gpu_hours = sum(j.hours * j.gpus for j in jobs)
    return Schedule(end, gpu_hours, nodes * gpus_per_node, max((j.hours for j in jobs), default=0.0))


def _place(job: Job, free: list[int], per_node: int) -> list[tuple[int, int]] | None:
    if not job.gang:  # anywhere: fill the fullest nodes first (pack)
        if sum(free) < job.gpus:
            return None
        out, need = [], job.gpus
        for node in sorted(range(len(free)), key=lambda i: free[i]):
            if free[node] and need:
                n = min(free[node], need)
                out.append((node, n))
                need -= n
        return out
    if job.gpus <= per_node:  # one node: the one it fits most tightly
        fits = [i for i, f in enumerate(free) if f >= job.gpus]
        return [(min(fits, key=lambda i: free[i]), job.gpus)] if fits else None
    whole = [i for i, f in enumerate(free) if f == per_node]
    need = math.ceil(job.gpus / per_node)
    return [(i, per_node) for i in whole[:need]] if len(whole) >= need else None

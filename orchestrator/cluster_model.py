"""The wall time a queue of planned trials takes on a cluster: list scheduling on the plan's own
estimates, without running anything (`moe-sweep plan --gpus N`, and the model that
`bench/cluster_schedule.py` sets beside the real orchestrator's simulated run).

Whenever GPUs free up, the queue is walked in order and every trial that fits starts, later
ones filling gaps an earlier one cannot use, but only among the first `window` trials still
waiting (Tune requests that many placement groups at once: the orchestrator's look-ahead is 8,
Tune's default hundreds; None: no limit). A gang trial (its
`placement` STRICT_PACK) needs its GPUs on one node, a larger one whole free nodes; a trial
without gang placement takes free GPUs anywhere (Ray's default soft packing). The driver starts
one trial at a time (`start_gap` hours each): a trial holds its GPUs from when it is placed
and runs once the driver has started it and its trial actor (a process) is up. The actor of a
trial that just ended takes the next trial of its width if one is waiting (Tune's actor reuse;
otherwise Tune kills it), and every other trial first waits for a new one to start
(`process_gap` hours each, one at a time: a simulation's whole cluster shares one machine's
cores). Simplified: an actor is known by its trial's width (Tune's key is the whole resource
request), and an idle one holds no GPUs.

The orchestrator's queue is the faster, by this model on the cluster at hand, of two orders
(`best_queue`): longest first, and widest first (one trial shape after another, so Tune reuses
its actors instead of starting new ones at every change of shape). Both pull short trials
forward when one start per `start_gap` would make the driver, not the GPUs, set the tail: never
at real speed (a start is ~0.2 s, a trial minutes to days), but in a simulation that compresses
a day into seconds (`start_gaps`). Against the simulated study on 8 x 8 fake GPUs
(bench/cluster_schedule.py): with actors counted the model predicts 1.064x the bound and 107
actors for widest first (staggered, see `widest_first`); the run measured 1.078x with 107
processes once Tune stopped killing starting actors (`actor_reuse.py`; before, 1.14-1.26x with
112-394). What the model does not
know is how Tune's actor cache behaves while trials of several shapes wait (it keeps fewer
actors than here).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

# Seconds of the driver's time one trial start takes: Tune's bookkeeping, the actor's reset, the
# trial's first rows (measured, bench/cluster_schedule.py on 2 cores: 0.07 s of the driver's own
# CPU per start at 5 trials/s, more while new actors start beside it). Only a simulation,
# which compresses a planned hour into seconds, makes this matter (`start_gap`).
DRIVER_SECONDS_PER_START = 0.2
# Seconds one new trial actor takes before its first trial: a Ray worker process, `import
# ray.tune` and the trainable's set-up, ~6 CPU-s (measured on 2 cores, bench/cluster_schedule.py),
# so ~3 s of a 2-core machine. On a real cluster each node starts its own, and a trial lasts
# minutes to days; a simulation on one machine pays them one after another, at SCALE.
PROCESS_SECONDS_PER_START = 3.0


@dataclass(frozen=True)
class Job:
    hours: float
    gpus: int
    gang: bool = True  # one node when it fits one, else whole nodes
    group: int = 0  # jobs of group g start only after every job of group g - 1 ended (sweeps run one after another)
    tag: Any = field(default=None, compare=False)  # what the job stands for (the caller's trial)


@dataclass(frozen=True)
class Schedule:
    makespan: float  # hours from the first start to the last end
    gpu_hours: float
    gpus: int
    longest: float
    actors: int = 0  # trial actors started (processes)

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


def longest_first(
    jobs: Iterable[Job], node_gpus: float = 8, gpus: int = 1, start_gap: float = 0.0, process_gap: float = 0.0
) -> list[Job]:
    """Whole-node trials first, then the rest; longest first within each (`queue_key`), short
    ones pulled forward as far as `start_gap` needs (`_pace`). (`process_gap` is unused here:
    every order of `ORDERS` takes the same arguments.)"""
    ordered = sorted(jobs, key=lambda j: queue_key(j.hours, j.gpus, node_gpus))
    wide = [j for j in ordered if j.gpus >= node_gpus]
    return wide + _pace(ordered[len(wide):], gpus, start_gap)


def widest_first(
    jobs: Iterable[Job], node_gpus: float = 8, gpus: int = 1, start_gap: float = 0.0, process_gap: float = 0.0
) -> list[Job]:
    """One width after another, widest first. Few changes of shape: Tune reuses a finished
    trial's actor only for a trial of the same shape, and every new actor is a process to start.

    The narrowest width goes longest first, short ones pulled forward as far as `start_gap`
    needs (`_pace`): its trials set the tail. Where new actors cost time (`process_gap` > 0: a
    simulation, whose whole cluster starts its processes on one machine), every other width goes
    shortest first, so that its last trials are its longest and end spread out: the next width's
    actors (64 one-GPU ones after the two-GPU trials, in the study) then start a few at a time
    while the rest still run, not all at once on idle GPUs. Measured on the simulated study
    (bench/cluster_schedule.py, 8 x 8): 1.078x the bound (model 1.064), against 1.093x (model
    1.087) with every width longest first. (A ramp between widths, each width's last
    cluster-full alternating with the next width's first half cluster-full, looks better still
    in this model, 1.042x with 113 actors, but measured 1.072x on the cluster, within the runs'
    noise of this order's: not worth its complexity.)"""
    jobs = list(jobs)
    widths = sorted({j.gpus for j in jobs}, reverse=True)
    out: list[Job] = []
    for width in widths:
        group = [j for j in jobs if j.gpus == width]
        if process_gap > 0 and width != widths[-1]:
            out += sorted(group, key=lambda j: j.hours)
        else:
            out += _pace(sorted(group, key=lambda j: -j.hours), gpus, start_gap)
    return out


def _pace(ordered: list[Job], gpus: int, start_gap: float) -> list[Job]:
    """`ordered` (longest first), except that the shortest job left goes next whenever the jobs
    left, started one per `start_gap`, would take the driver longer than their work takes the
    GPUs: the tail of many short trials would wait on the driver, not on the GPUs."""
    if start_gap <= 0 or not ordered:
        return list(ordered)
    out, lo, hi = [], 0, len(ordered) - 1
    work = sum(j.hours * j.gpus for j in ordered)
    while lo <= hi:
        if (hi - lo + 1) * start_gap > work / gpus:
            job, hi = ordered[hi], hi - 1
        else:
            job, lo = ordered[lo], lo + 1
        out.append(job)
        work -= job.hours * job.gpus
    return out


ORDERS: dict[str, Callable[..., list[Job]]] = {"longest first": longest_first, "widest first": widest_first}


def start_gaps(scale: float | None = None) -> tuple[float, float]:
    """The driver's planned hours per start and a new actor's, for a simulation at `scale` (its
    seconds per planned second) or a real run (None: an actor's start is in the plan's own
    start-up term, and a real cluster's nodes start theirs side by side)."""
    if scale is None:
        return DRIVER_SECONDS_PER_START / 3600, 0.0
    return DRIVER_SECONDS_PER_START / 3600 / scale, PROCESS_SECONDS_PER_START / 3600 / scale


def best_queue(
    jobs: Sequence[Job], nodes: int, gpus_per_node: int, start_gap: float = 0.0, process_gap: float = 0.0
) -> tuple[str, list[Job], Schedule]:
    """The order of `ORDERS` this model finishes soonest on `nodes` x `gpus_per_node` (ties: the
    first), with its schedule."""
    best: tuple[str, list[Job], Schedule] | None = None
    for name, order in ORDERS.items():
        queue = order(jobs, gpus_per_node, nodes * gpus_per_node, start_gap, process_gap)
        s = simulate(queue, nodes, gpus_per_node, start_gap=start_gap, process_gap=process_gap)
        if best is None or s.makespan < best[2].makespan - 1e-9:
            best = (name, queue, s)
    assert best is not None
    return best


def simulate(
    jobs: Sequence[Job], nodes: int, gpus_per_node: int, window: int | None = 8, start_gap: float = 0.0,
    process_gap: float = 0.0,
) -> Schedule:
    """List-schedule `jobs` in their order on `nodes` x `gpus_per_node` GPUs, the driver taking
    `start_gap` hours to start each and a new trial actor `process_gap`."""
    for j in jobs:
        if j.gpus > nodes * gpus_per_node:
            raise ValueError(f"a trial of {j.gpus} GPUs cannot run on {nodes} x {gpus_per_node}")
    free = [gpus_per_node] * nodes
    running: list[tuple[float, int, int, list[tuple[int, int]]]] = []  # (end, seq, width, [(node, gpus)])
    idle: Counter[int] = Counter()  # actors of the trials that just ended, by width
    groups = sorted({j.group for j in jobs})
    now, seq, end, driver, starter = 0.0, 0, 0.0, 0.0, 0.0
    actors = 0
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
                ready = now  # its GPUs are held from now; it runs once its actor is up and the driver started it
                if idle[j.gpus]:
                    idle[j.gpus] -= 1
                else:
                    ready = starter = max(now, starter) + process_gap
                    actors += 1
                # The driver's part does not wait for the actor: Tune starts actors asynchronously.
                turn = max(now, driver)
                driver = turn + start_gap
                begin = max(ready, turn)
                heapq.heappush(running, (begin + j.hours, seq, j.gpus, taken))
                seq += 1
            queue = left
            # Tune keeps an idle actor only while a trial of its width waits for it.
            waiting = Counter(j.gpus for j in (left if window is None else left[:window]))
            idle = Counter({w: min(n, waiting[w]) for w, n in idle.items()})
            if not running:
                break
            now = running[0][0]
            while running and running[0][0] <= now:  # everything ending at the same time
                _, _, width, taken = heapq.heappop(running)
                idle[width] += 1
                for node, n in taken:
                    free[node] += n
            end = max(end, now)
        while running:  # the group's stragglers, before the next group starts
            now, _, _, taken = heapq.heappop(running)
            for node, n in taken:
                free[node] += n
        idle.clear()
        end = max(end, now)
    gpu_hours = sum(j.hours * j.gpus for j in jobs)
    return Schedule(end, gpu_hours, nodes * gpus_per_node, max((j.hours for j in jobs), default=0.0), actors)


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

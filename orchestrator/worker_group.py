"""A wide trial's data-parallel workers, started inside the placement group Tune reserved for it.

Why not Ray Train's `TorchTrainer`: Ray Train V2 (Ray's default) always reserves a placement
group of its own for its workers. Inside a Tune trial that would hold the trial's GPUs twice, or,
with only a token reserved by Tune (Ray's suggestion), it would take every wide trial out of
Tune's queue: its workers' group is requested only once its driver process is up, and narrow
trials keep taking the GPUs it waits for. `bench/cluster_schedule.py` measured that on the
study: 8-GPU trials waited 10-20x their planned time and the GPUs were 28% used. So Tune reserves
each trial's whole shape, in queue order and as one gang (`sweep_runner.trial_resources`), and
this module starts the trial's other ranks in that group's bundles, as Ray Train V1 did.

Rank 0 is the trial's own process (bundle 0): it trains with the Tune reporter, so a wide trial
reports and checkpoints exactly as a one-worker trial does. Ranks 1..W-1 are actors pinned to
bundles 1..W-1. The process group is torch's env:// rendezvous (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK) that `moe_core.train.distributed.init_from_env` joins, as under torchrun.
Ranks on one node see all of that node's GPUs of the trial (CUDA_VISIBLE_DEVICES, LOCAL_RANK),
as Ray Train arranges, so NCCL can use NVLink between them. A rank that fails (a lost node
included) fails the trial, and Tune retries it from its last checkpoint.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES")


def _where() -> tuple[str, str, list[str]]:
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ray.util.get_node_ip_address(), [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class _Rank:
    """One worker process of a wide trial (ranks 1..W-1)."""

    def where(self) -> tuple[str, str, list[str]]:
        return _where()

    def run(self, env: dict[str, str], fn: Callable[..., Any], *args: Any) -> None:
        os.environ.update(env)
        fn(*args)


def rank_envs(places: list[tuple[str, str, list[str]]], port: int) -> list[dict[str, str]]:
    """torch.distributed's environment for each rank, from (node, ip, GPU ids) of each."""
    envs = []
    for rank, (node, _, gpus) in enumerate(places):
        peers = [i for i, p in enumerate(places) if p[0] == node]
        env = {"MASTER_ADDR": places[0][1], "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(len(places)),
               "LOCAL_RANK": str(peers.index(rank)), "LOCAL_WORLD_SIZE": str(len(peers))}
        node_gpus = [g for i in peers for g in places[i][2]]
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            env["LOCAL_RANK"] = str(node_gpus.index(gpus[0]))
        envs.append(env)
    return envs


def run_group(workers: int, cpus: float, gpus: float, worker_fn: Callable[..., Any], worker_args: tuple,
              rank0: Callable[[], Any]) -> Any:
    """Start ranks 1..W-1 in the current placement group's bundles 1..W-1, run `rank0` here as
    rank 0, and wait for the others (re-raising the first failure); returns `rank0()`'s value."""
    import torch

    pg = get_current_placement_group()
    if pg is None:
        raise RuntimeError("a wide trial runs inside the placement group Tune reserved for it")
    ranks = [
        _Rank.options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=i, placement_group_capture_child_tasks=False)).remote()
        for i in range(1, workers)
    ]
    saved = {k: os.environ.get(k) for k in _ENV}
    try:
        places = [_where()] + ray.get([r.where.remote() for r in ranks])
        envs = rank_envs(places, _free_port())
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # a reused process keeps its own view
            envs[0].pop("CUDA_VISIBLE_DEVICES", None)
            envs[0]["LOCAL_RANK"] = "0"
        running = [r.run.remote(env, worker_fn, *worker_args) for r, env in zip(ranks, envs[1:])]
        os.environ.update(envs[0])
        result = rank0()
        ray.get(running)
        return result
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # the process may run the next trial (reused actor)
        for r in ranks:
            ray.kill(r)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

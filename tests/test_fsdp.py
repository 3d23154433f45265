"""FSDP2 sharding (`train.sharding: fsdp`): two gloo workers reproduce one process for every
layout, activation checkpointing changes neither losses nor gradients, and a Ray sweep runs a
sharded two-worker trial."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from moe_core.model import build_model
from moe_core.train.callbacks import TrainCallback
from moe_core.train.checkpoint import load_latest, restore
from moe_core.train.loop import train_trial
from moe_core.trial import TrialConfig
from tests.conftest import experts, tiny

SETS = [{"num_experts": 4, "top_k": 2, "granularity": 0.5}]
# Balancing that is the same for one worker and two (the global-batch aux loss and UniPool's
# pool loss see a worker's own micro-batches, so they differ by design: tests/test_train.py).
LAYOUTS = {
    "dense": {"layout": "dense"},
    "layerwise": {"layout": "layerwise", "experts": SETS, "balance": {"bias_rate": 0.01, "z_weight": 0.001}},
    # NormRouter: its scalar sigma stays replicated (FSDP shards no scalars).
    "unipool": {"layout": "unipool", "experts": SETS, "router": {"scoring": "norm"}, "balance": {"bias_rate": 0.01}},
    "pathmoe": {"layout": "layerwise", "experts": SETS, "router": {"block_size": 2}, "balance": {"bias_rate": 0.01}},
}


def fsdp_trial(cache: Path, moe: dict[str, Any], **train: Any) -> TrialConfig:
    """Two layers, d 32; four micro-batches of four sequences per step (two per worker)."""
    return TrialConfig.from_dict({
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": 32, "moe": moe},
        "train": {"steps": 4, "batch_tokens": 512, "micro_batch_size": 4, "eval_every": 4, "eval_tokens": 256,
                  "sharding": "fsdp", **train},
        "data": {"tokenizer": "bytes", "cache_dir": str(cache)},
    })


class Stop(Exception):
    """A worker leaving mid-trial (after a checkpoint), as if killed."""


class StopAt(TrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, row: dict[str, Any], model: Any) -> None:
        if step == self.step:
            raise Stop


def _worker(rank: int, world: int, init: str, trial: dict[str, Any], out: str, stop_at: int | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        train_trial(TrialConfig.from_dict(trial), out, callbacks=[StopAt(stop_at)] if stop_at else [])
    except Stop:
        pass
    # Both workers past their last collective before either tears gloo down, and no interpreter
    # finalisation after it: a worker aborted there once in CI ("terminate called without an
    # active exception", a C++ thread destroyed at exit) after its outputs were written.
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def train_two_workers(trial: TrialConfig, out: Path, stop_at: int | None = None) -> None:
    """`trial` on two gloo workers in fresh processes; `stop_at`: leave after that step."""
    import torch.multiprocessing as mp

    init = f"file://{out.parent / ('pg-' + out.name)}"
    mp.spawn(_worker, args=(2, init, trial.to_dict(), str(out), stop_at), nprocs=2)


def losses(out: Path) -> list[float]:
    return pq.read_table(out / "metrics.parquet").column("train_loss").to_pylist()


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """The latest sharded checkpoint loaded into a whole model, in this one process."""
    trial = TrialConfig.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    model = build_model(trial.model)
    restore(load_latest(out / "checkpoints", trial.to_dict()), model)
    return model.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("layout,checkpointing", [(name, False) for name in LAYOUTS] + [("layerwise", True)])
def test_two_fsdp_workers_match_one_process(cache, tmp_path, layout, checkpointing):
    """Same global batch: FSDP's averaged gradients, the load counts summed over workers and the
    replicated scalars' averaged gradients give one process's losses and parameters."""
    one = fsdp_trial(cache, LAYOUTS[layout])
    train_two_workers(one.replace(train=one.train.replace(activation_checkpointing=checkpointing)), tmp_path / "two")
    train_trial(one, tmp_path / "one")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    two, single = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    assert two.keys() == single.keys()
    for name in two:
        if name.endswith("usage_N"):  # each worker's own training pairs (also under DDP)
            continue
        if name.endswith("bias_N"):  # moved by the summed load counts: exactly the same
            assert torch.equal(two[name], single[name]), name
        else:
            torch.testing.assert_close(two[name], single[name], rtol=1e-5, atol=1e-6, msg=name)


def _steps(model, batches: list[torch.Tensor], micro: int = 2) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """Optimizer steps of `micro` micro-batches each: losses, and each step's gradients."""
    losses_, grads = [], []
    for start in range(0, len(batches), micro):
        for idx in batches[start : start + micro]:
            out = model(idx[:, :-1], idx[:, 1:])
            (out.loss / micro).backward()
            losses_.append(out.loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
                p.grad = None
        model.finish_step()
    return losses_, grads


@pytest.mark.parametrize("layout", ["layerwise", "unipool"])
def test_activation_checkpointing_changes_no_loss_gradient_or_counter(layout):
    """Recomputing a MoE block in the backward counts its loads once and sees the same
    global-batch loads: the same losses, gradients, biases and usage, bit for bit."""
    balance = {"aux_weight": 0.01, "aux_scope": "global_batch", "bias_rate": 0.01, "z_weight": 0.001}
    if layout == "unipool":
        balance["pool_weight"] = 0.01
    moe = {"layout": layout, "experts": [experts(4, 2)], "balance": balance, "router": {"block_size": 2}}
    cfg = tiny(moe, n_layers=2)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (2, cfg.seq_len + 1), generator=gen) for _ in range(4)]
    runs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.set_activation_checkpointing(checkpointing)
        runs.append((*_steps(model, batches), model.state_dict()))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(a[n], b[n]) for a, b in zip(grads_a, grads_b) for n in a)
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)


@pytest.mark.slow
def test_ray_sweep_runs_a_sharded_two_worker_trial(tmp_path, cache):
    from orchestrator.results import SweepPaths, read_rows
    from orchestrator.sweep_runner import run_sweep
    from tests.test_orchestrator import options, quiet, sweep_yaml

    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [4]}\n", name="fsdp")
    path.write_text(path.read_text().replace("resources: {cpus: 1}", "resources: {cpus: 1, workers: 2, sharding: fsdp}")
                    .replace("batch_tokens: 1024", "batch_tokens: 2048"))
    assert run_sweep(path, options(tmp_path), quiet()) == {"completed": 1}
    row = read_rows(SweepPaths(tmp_path / "runs", "fsdp").trials)[0]
    trial = TrialConfig.from_dict(json.loads(row["config_json"]))
    assert trial.train.sharding == "fsdp"
    checkpoints = SweepPaths(tmp_path / "runs", "fsdp").trial_dir(row["trial_id"]) / "checkpoints"
    assert (checkpoints / (checkpoints / "latest").read_text() / ".metadata").exists()  # written by DCP
    single = train_trial(trial, tmp_path / "single")  # one process, outside Ray
    assert row["val_loss"] == pytest.approx(single.val_loss, rel=1e-4)

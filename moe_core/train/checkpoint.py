"""Atomic checkpoints: written under a temporary name, then renamed, so a crash never leaves a
half-written one; `latest` names the newest. The two newest are kept.

Two layouts; `train.sharding` picks one (so one trial's folder never mixes them):
- `stepNNNNNNNN.pt` (`none`): one file rank 0 writes: model, optimizer and trainer state.
- `stepNNNNNNNN/` (`fsdp`): a `torch.distributed.checkpoint` folder in which every worker writes
  its own shards of the model and optimizer (nothing is gathered), plus `trainer.pt` (config,
  step, metric rows, RNG) from rank 0. It loads at any number of workers, one process without a
  process group included (for evaluation or export): DCP reshards on load.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)

from moe_core.files import atomic_path, write_text
from moe_core.model import MoETransformer, build_model
from moe_core.train.distributed import DataParallel
from moe_core.trial import TrialConfig, load_trial_config

FORMAT = "moe-sweep-checkpoint-v1"
SHARDED_FORMAT = "moe-sweep-sharded-checkpoint-v1"
TRAINER_FILE = "trainer.pt"  # the trainer state in a sharded checkpoint's folder
KEEP = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, or from another trial."""


def save_checkpoint(directory: Path, step: int, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "step": step, **state}, tmp)
    _publish(directory, path)
    return path


def save_sharded_checkpoint(
    directory: Path, step: int, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
    dp: DataParallel,
) -> Path:
    """Every worker calls this; `state` (the trainer's, without model and optimizer) is rank 0's."""
    path = directory / f"step{step:08d}"
    tmp = directory / f".{path.name}.tmp"
    if dp.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
    dp.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if dp.is_main:  # dcp.save returns once every worker's shards and the metadata are written
        torch.save({"format": SHARDED_FORMAT, "step": step, **state}, tmp / TRAINER_FILE)
        shutil.rmtree(path, ignore_errors=True)  # an earlier try at this step that never became `latest`
        os.replace(tmp, path)
        _publish(directory, path)
    dp.barrier()  # no worker goes on (or exits) before the checkpoint is in place
    return path


def _publish(directory: Path, path: Path) -> None:
    """Point `latest` at `path`, then drop all but the newest checkpoints."""
    write_text(directory / "latest", path.name)
    for old in sorted(directory.glob("step*"))[:-KEEP]:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


def load_latest(directory: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The newest checkpoint's state (its location under `path`), or None if there is none.
    Raises `CheckpointError` if it is unreadable or was written by a trial with a different
    config. Give the state to `restore` for the model and optimizer."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    try:
        state = torch.load(path / TRAINER_FILE if path.is_dir() else path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(err).__name__}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(f"{path}: not a moe-sweep checkpoint")
    if state.get("config") != config:
        raise CheckpointError(f"{path}: written by a trial with a different config; use another --out folder")
    return {**state, "path": path}


def load_trained(run_dir: Path) -> tuple[TrialConfig, MoETransformer]:
    """A finished (or interrupted) trial's config and model with its latest checkpoint's weights,
    on the CPU, in eval mode: for scoring or export after training."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(f"{run}: not a trial folder (no config.yaml; give the folder `moe-sweep train --out` "
                              "or a sweep's runs/<sweep>/trial_runs/<trial_id>)")
    trial = load_trial_config(run / "config.yaml")
    state = load_latest(run / "checkpoints", trial.to_dict())
    if state is None:
        raise CheckpointError(f"{run}: no checkpoint yet (a trial writes one at the end, and every train.checkpoint_every steps)")
    model = build_model(trial.model)
    restore(state, model)
    return trial, model.eval()


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a checkpoint's model (and optimizer) into `model` as it is here: sharded over any
    number of workers (every worker calls this), or whole in one process."""
    if state["format"] == FORMAT:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return
    if optimizer is None:
        loaded = {"model": get_model_state_dict(model)}
        with _one_process_quietly():
            dcp.load(loaded, checkpoint_id=state["path"])
        set_model_state_dict(model, loaded["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    with _one_process_quietly():
        dcp.load(loaded, checkpoint_id=state["path"])
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns at every save and load without a process group, which is how one process uses
    it here on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield

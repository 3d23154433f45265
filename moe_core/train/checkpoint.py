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
import time
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

from moe_core.files import DamagedFileWarning, atomic_path, fresh_dir, move_into_place, write_text
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
        fresh_dir(tmp)
    dp.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
    if dp.is_main:  # dcp.save returns once every worker's shards and the metadata are written
        torch.save({"format": SHARDED_FORMAT, "step": step, **state}, tmp / TRAINER_FILE)
        move_into_place(tmp, path, over_earlier=True)  # an earlier try at this step never became `latest`
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


def load_latest(directory: Path, config: dict[str, Any], keep_aside: bool = True) -> dict[str, Any] | None:
    """The newest readable checkpoint's state (its location under `path`), or None if there is none.

    Checkpoints are written atomically, but a file can still be damaged from outside (a full disk
    on shared storage, a node lost mid-copy). An unreadable one is moved to `damaged/` beside it
    (never deleted; with `keep_aside`, which only one worker of a group should do) with a
    warning, and the one before it is used; if none is left, the trial starts over. Raises
    `CheckpointError` for a checkpoint written by a trial with a different config (a reused
    folder: a user mistake, not damage). Give the state to `restore` for the model and optimizer."""
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    newest = pointer.read_text().strip()
    older = sorted((p.name for p in directory.glob("step*") if p.name < newest), reverse=True)
    for name in [newest, *older]:
        path = directory / name
        state, damage = _read(path)
        if damage is None:
            if state.get("config") != config:
                raise CheckpointError(f"{path}: written by a trial with a different config; use another --out folder")
            if keep_aside and name != newest:
                write_text(pointer, name)
            return {**state, "path": path}
        kept = f"; kept as {_set_aside(path)}" if keep_aside and path.exists() else ""
        warnings.warn(f"{path}: damaged checkpoint ({damage}){kept}; trying the one before it",
                      DamagedFileWarning, stacklevel=2)
    if keep_aside:
        pointer.unlink(missing_ok=True)
    warnings.warn(f"{directory}: no readable checkpoint left; the trial starts over", DamagedFileWarning, stacklevel=2)
    return None


def _read(path: Path) -> tuple[dict[str, Any], str | None]:
    """A checkpoint's trainer state, or why it cannot be used."""
    if not path.exists():
        return {}, "missing"
    if path.is_dir() and not (path / ".metadata").is_file():
        return {}, "no DCP metadata"
    try:
        state = torch.load(path / TRAINER_FILE if path.is_dir() else path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        return {}, f"cannot read checkpoint: {type(err).__name__}"
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, SHARDED_FORMAT):
        return {}, "not a moe-sweep checkpoint"
    return state, None


def _set_aside(path: Path) -> Path:
    aside = path.parent / "damaged" / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    return aside


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

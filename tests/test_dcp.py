"""Sharded checkpoints (`train.sharding: fsdp`, torch.distributed.checkpoint): every worker
writes its own shards, a checkpoint appears whole or not at all, and a trial resumes at another
number of workers (one process included) with the losses of an uninterrupted run."""

from __future__ import annotations

import pytest

from moe_core.train.checkpoint import CheckpointError
from moe_core.train.loop import train_trial
from moe_core.trial import TrialConfig
from tests.deps import require
from tests.test_fsdp import LAYOUTS, Stop, StopAt, fsdp_trial, losses, train_two_workers


def _trial(cache, **train) -> TrialConfig:
    return fsdp_trial(cache, LAYOUTS["layerwise"], **{"steps": 6, "checkpoint_every": 2, **train})


@pytest.fixture(scope="module")
def whole(cache, tmp_path_factory) -> list[float]:
    """The uninterrupted run's losses (one process)."""
    out = tmp_path_factory.mktemp("whole")
    train_trial(_trial(cache), out)
    return losses(out)


@pytest.mark.slow
def test_two_workers_save_and_one_process_resumes(cache, tmp_path, whole):
    train_two_workers(_trial(cache), tmp_path, stop_at=5)
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step00000002", "step00000004"]
    # One shard file per worker (nothing gathered), DCP's metadata and the trainer's state.
    assert sorted(p.name for p in (checkpoints / "step00000004").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt"]
    resumed = train_trial(_trial(cache), tmp_path)
    assert resumed.steps == 6
    assert losses(tmp_path) == pytest.approx(whole, rel=1e-6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step00000004", "step00000006"]


@pytest.mark.slow
def test_one_process_saves_and_two_workers_resume(cache, tmp_path, whole):
    with pytest.raises(Stop):
        train_trial(_trial(cache), tmp_path, callbacks=[StopAt(5)])
    checkpoints = tmp_path / "checkpoints"
    stale = checkpoints / ".step00000006.tmp"  # as a crash while saving step 6 would leave it
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half a shard")
    train_two_workers(_trial(cache), tmp_path)
    assert losses(tmp_path) == pytest.approx(whole, rel=1e-6)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step00000004", "step00000006"]


def test_a_sharded_checkpoint_of_another_config_or_damaged_is_refused(cache, tmp_path):
    train_trial(_trial(cache, steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="different config"):
        train_trial(_trial(cache, steps=3, lr=0.5), tmp_path)
    (tmp_path / "checkpoints" / "step00000002" / "trainer.pt").unlink()
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train_trial(_trial(cache, steps=2), tmp_path)


def test_a_sharded_checkpoint_travels_as_a_tune_checkpoint(cache, tmp_path):
    """A one-worker trial's Tune checkpoint is the checkpoint's folder; a retry placed elsewhere
    brings it into its trial folder and resumes from it."""
    require("ray")
    from ray import tune

    from orchestrator.trial_fn import _copy_checkpoint, _restore_tune_checkpoint

    train_trial(_trial(cache, steps=2), tmp_path / "first")
    saved = tmp_path / "first" / "checkpoints" / "step00000002"
    (tmp_path / "tune").mkdir()
    _copy_checkpoint(saved, tmp_path / "tune")
    (tmp_path / "tune" / "latest").write_text(saved.name)
    _restore_tune_checkpoint(tune.Checkpoint.from_directory(tmp_path / "tune"), tmp_path / "retry" / "checkpoints")
    resumed = train_trial(_trial(cache, steps=2), tmp_path / "retry", callbacks=[StopAt(1)])  # trains no step
    assert resumed.steps == 2 and losses(tmp_path / "retry") == losses(tmp_path / "first")

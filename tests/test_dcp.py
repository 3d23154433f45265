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


def test_a_sharded_checkpoint_of_another_config_is_refused_and_a_damaged_one_set_aside(cache, tmp_path, whole):
    train_trial(_trial(cache, steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="different config"):
        train_trial(_trial(cache, steps=3, lr=0.5), tmp_path)
    train_trial(_trial(cache), tmp_path / "six")  # keeps the checkpoints of steps 4 and 6
    (tmp_path / "six" / "checkpoints" / "step00000006" / ".metadata").unlink()  # the shards' index lost
    with pytest.warns(UserWarning, match="step00000006: damaged checkpoint .no DCP metadata.; kept as"):
        train_trial(_trial(cache), tmp_path / "six")  # resumes from step 4, trains 5 and 6 again
    assert losses(tmp_path / "six") == pytest.approx(whole, rel=1e-6)
    assert [p.name.split(".")[0] for p in (tmp_path / "six" / "checkpoints" / "damaged").iterdir()] == ["step00000006"]


def test_tune_reports_follow_the_checkpoint_of_their_step(cache, tmp_path, monkeypatch):
    """Tune gets each evaluation, without a Tune checkpoint (the trial folder, on storage every
    node sees, is where a retry resumes from); at a checkpoint step the report comes only once
    that checkpoint is written, so Tune never sees past what a retry resumes from."""
    require("ray")
    from ray import tune

    from orchestrator.trial_fn import TuneReporter

    seen: list[tuple[int, str | None]] = []

    def report(metrics, checkpoint=None):
        assert checkpoint is None
        latest = tmp_path / "checkpoints" / "latest"
        seen.append((metrics["step"], latest.read_text() if latest.exists() else None))

    monkeypatch.setattr(tune, "report", report)
    trial = _trial(cache, eval_every=1)
    train_trial(trial, tmp_path, callbacks=[TuneReporter("t", "s", trial.train.checkpoint_every, trial.total_steps)])
    assert [step for step, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert all(latest == f"step{step:08d}" for step, latest in seen if step % 2 == 0)

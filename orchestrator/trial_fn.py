"""What one Ray Tune trial runs: the moe_core trainer on a planned, resolved trial config.

The trial writes its own results (a `running` row when it starts, its final row and steps when it
ends) so that a crash of the driver loses nothing a trial finished. It trains in
`runs/<sweep>/trial_runs/<trial_id>/`, so a re-run of the same trial (a Tune retry, or a later
`moe-sweep run` after the driver was killed) resumes from the trainer's last checkpoint there:
`runs/` is on storage every node sees, so a retry placed on another node finds it. Each
evaluation is reported to Tune (for search and early stopping) without a Tune checkpoint: one
would be a second and third copy of every checkpoint (GBs for the largest trials), and with
Tune's `num_to_keep` each one forces a save of the whole experiment's state (a second or more
with 2,358 trials: measured, it was most of the driver's time). Trials with several workers run data-parallel in the placement
group Tune reserved for them (`orchestrator.worker_group`; gloo on CPU, nccl on GPU): DDP, or
FSDP2 when the trial's `train.sharding` is `fsdp`; the trial's own process is rank 0.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_core.trial import TrialConfig
from orchestrator.planned import PlannedTrial
from orchestrator.results import (FAILED, INFEASIBLE, RUNNING, DamagedFile, SweepPaths, copy_steps, planned_columns,
                                  point_columns, read_rows_of, trial_row, write_row)

# Keys of the trainer's step rows that are reported to Tune (names with '/' are per-set or
# per-layer detail: they go to the steps table only).
_REPORT_EXCLUDE = ("routing/", "val_loss/")


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a run shares (passed once through the object store)."""

    runs_dir: str
    # sweep name -> (method, the snapshot of its YAML (bayes trials resolve their point from it),
    # its first training seed (bayes: the seed of every point), its parameter names)
    sweeps: dict[str, tuple[str, str, int, tuple[str, ...]]]
    noop: bool = False  # skip training: the orchestrator's own overhead, for benchmarks
    simulate: float | None = None  # hold the trial's resources for planned hours x this, no training


def queue_key(sweep: str, trial_id: str) -> str:
    """A trial's name in a queue of several sweeps (ids are per sweep: two sweeps may plan the
    same resolved trial)."""
    return f"{sweep}/{trial_id}"


def split_key(key: str) -> tuple[str, str]:
    sweep, _, trial_id = key.rpartition("/")
    return sweep, trial_id


def infeasible_id(point: dict[str, Any]) -> str:
    canonical = json.dumps(point, sort_keys=True, default=str)
    return "x" + hashlib.sha256(canonical.encode()).hexdigest()[:11]


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable."""
    if "trial" in config:  # grid / random: the driver wrote the resolved plan
        sweep, tid = split_key(config["trial"])
        paths = SweepPaths(ctx.runs_dir, sweep)
        planned = PlannedTrial.read(paths.plan / f"{tid}.json")
    else:  # bayes: resolve the sampled point into a FLOP-matched trial here
        from orchestrator.planner import Planner, SweepFile
        from orchestrator.study import Infeasible

        sweep = next(iter(ctx.sweeps))
        method, sweep_file, seed, names = ctx.sweeps[sweep]
        paths = SweepPaths(ctx.runs_dir, sweep)
        point = {name: config[name] for name in names}
        try:
            planned = Planner(SweepFile(sweep_file)).resolve(point, seed)
        except Infeasible as why:
            tid = infeasible_id(point)
            base = point_columns(tid, sweep, method, seed, point)
            write_row(paths.trials / f"{tid}.parquet", trial_row(base, INFEASIBLE, error=str(why)))
            return  # no result: Optuna records the point as pruned, i.e. infeasible
    tid = planned.trial_id
    out = paths.trial_dir(tid)
    file = paths.trials / f"{tid}.parquet"
    try:
        before = read_rows_of(file)
    except DamagedFile:  # damaged since the driver repaired the sweep: this attempt's row replaces it
        before = []
    attempt = int((before[0].get("attempts") or 0) if before else 0) + 1  # starts of this trial, retries and resumes
    now = time.time()
    first = (before[0].get("first_started_at") if before else None) or now
    base = planned_columns(planned, _node_id()) | {
        "attempts": attempt, "started_at": now, "first_started_at": first, "simulated": ctx.simulate is not None}
    write_row(file, trial_row(base, RUNNING))
    try:
        summary = _simulate(planned, out, ctx.simulate) if ctx.simulate is not None else _train(planned, out, ctx)
    except Exception as err:  # recorded, then re-raised so Tune applies the retry policy
        copy_steps(paths, tid)
        write_row(file, trial_row(base, FAILED, error=_error_text(err)))
        raise
    copy_steps(paths, tid)
    write_row(file, trial_row(base, summary["status"], summary))


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray (a direct call in a test)
        return None


def _error_text(err: BaseException) -> str:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return (f"{type(err).__name__}: {err}\n" + "".join(lines[-6:]))[:4000]


def _train(planned: PlannedTrial, out: Path, ctx: TrialContext) -> dict[str, Any]:
    if ctx.noop:  # the overhead bench: before importing torch and the trainer (~2 s a worker)
        from ray import tune

        tune.report({"moe_trial_id": planned.trial_id, "moe_sweep": planned.sweep, "evals": 1, "step": 0,
                     "val_loss": 0.0})
        return {"status": "completed", "steps": 0, "tokens": 0, "val_loss": 0.0, "val_loss_by_set": {}}
    import torch

    from moe_core.train.loop import train_trial

    trial = planned.config
    torch.set_num_threads(max(1, int(planned.shape.cpus_per_worker)))
    reporter = TuneReporter(planned.trial_id, planned.sweep, trial.train.checkpoint_every, trial.total_steps)
    if planned.shape.workers > 1:
        return _train_data_parallel(planned, out, reporter)
    return train_trial(trial, out, callbacks=[reporter]).to_dict()


def _report_metrics(tid: str, sweep: str, evals: int, row: dict[str, Any]) -> dict[str, Any]:
    out = {"moe_trial_id": tid, "moe_sweep": sweep, "evals": evals}
    for key, value in row.items():
        if isinstance(value, (int, float)) and not key.startswith(_REPORT_EXCLUDE):
            out[key] = value
    return out


class TuneReporter:
    """Trainer callback: report each evaluation to Tune. At a checkpoint step the report waits for
    the checkpoint (in the trial folder), so that what Tune has seen is never ahead of what a
    retry resumes from."""

    def __init__(self, trial_id: str, sweep: str, checkpoint_every: int, total_steps: int) -> None:
        self.trial_id, self.sweep, self.every, self.total = trial_id, sweep, checkpoint_every, total_steps
        self.evals = 0
        self.pending: dict[str, Any] | None = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.evals += 1

    def on_step(self, step: int, row: dict[str, Any], model: Any) -> None:
        if "val_loss" not in row:
            return
        self.pending = _report_metrics(self.trial_id, self.sweep, self.evals, row)
        if not (step == self.total or (self.every and step % self.every == 0)):
            self._report()

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.pending is not None and self.pending.get("step") == step:
            self._report()

    def _report(self) -> None:
        from ray import tune

        metrics, self.pending = self.pending, None
        tune.report(metrics)


def _worker_loop(trial: TrialConfig, out: str, threads: int) -> None:
    """Ranks 1..W-1 of a wide trial (`orchestrator.worker_group`): join the process group, train."""
    import torch

    from moe_core.train.distributed import init_from_env
    from moe_core.train.loop import train_trial

    torch.set_num_threads(max(1, threads))
    init_from_env()
    train_trial(trial, out)


def _train_data_parallel(planned: PlannedTrial, out: Path, reporter: TuneReporter) -> dict[str, Any]:
    """Rank 0 here (reporting to Tune), the other ranks in the trial's placement group."""
    from moe_core.train.distributed import init_from_env
    from moe_core.train.loop import train_trial
    from orchestrator.worker_group import run_group

    trial, shape = planned.config, planned.shape

    def rank0() -> dict[str, Any]:
        init_from_env()
        return train_trial(trial, out, callbacks=[reporter]).to_dict()

    args = (trial, str(out), int(shape.cpus_per_worker))
    return run_group(shape.workers, shape.cpus_per_worker, shape.gpus_per_worker, _worker_loop, args, rank0)


def _simulate(planned: PlannedTrial, out: Path, scale: float) -> dict[str, Any]:
    """`--simulate SCALE`: hold the trial's resources for its planned wall time x SCALE instead of
    training, through the same steps as a real trial (start-up, evaluations reported at the
    planned cadence, checkpoints Tune keeps and a retry resumes from)."""
    from orchestrator.simulation import simulate_trial

    return simulate_trial(planned, out, scale)

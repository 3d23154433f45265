"""`moe-sweep run SWEEP.yaml`: plan the sweep, then run its trials as Ray Tune trials.

Resuming is by trial id. Every run plans the YAML again and hands Tune only the trials without a
finished row (`results.TERMINAL`); each of those resumes from its own checkpoint in
`runs/<sweep>/trial_runs/<id>/`. So a second run after the driver was killed re-runs nothing
that finished and continues what was interrupted, and an extended YAML runs only its new ids.
Bayesian sweeps keep their Optuna study in `runs/<sweep>/optuna.db` and sample only the points
still missing. `--restart` deletes the sweep's folder and starts over.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock, Timeout
from ray import tune
from ray.tune import Callback
from rich.console import Console

from moe_core.errors import ConfigError
from moe_core.files import write_json
from orchestrator.live_view import LiveView
from orchestrator.mlflow_sync import MLflowSync, default_uri
from orchestrator.planner import Plan, SweepFile, plan_sweep
from orchestrator.ray_session import auth_token_path, cleanup_orphans, start_ray, stop_ray
from orchestrator.results import FAILED, RUNNING, STOPPED, TERMINAL, SweepPaths, read_rows, read_rows_of, trial_row, trial_states, write_row
from orchestrator.trial_fn import TrialContext, run_trial, trial_meta


# Tune pickles its run config (callbacks included) into its experiment state; the callback holds
# only a key into this table of driver-side objects (live view, MLflow client), which cannot be pickled.
_DRIVER_OBJECTS: dict[str, tuple[SweepPaths, LiveView, MLflowSync]] = {}


@dataclass
class RunOptions:
    runs_dir: str = "runs"
    address: str | None = None  # None: a local Ray instance
    restart: bool = False
    mlflow_uri: str | None = None  # None: sqlite under runs/
    num_cpus: float | None = None  # local Ray only; None: all cores
    dashboard: bool = True
    noop: bool = False  # trials skip training (bench/orchestrator_overhead.py measures the rest)


class ResultsCallback(Callback):
    """Driver side: keep the live view current, write the rows a trial could not write itself
    (stopped early by ASHA, or its process died), mirror finished trials to MLflow."""

    def __init__(self, paths: SweepPaths, view: LiveView, mlflow: MLflowSync) -> None:
        self.key = str(paths.root)
        _DRIVER_OBJECTS[self.key] = (paths, view, mlflow)

    def _objects(self) -> tuple[SweepPaths, LiveView, MLflowSync]:
        return _DRIVER_OBJECTS[self.key]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "moe_trial_id" in result:
            view = self._objects()[1]
            tid = result["moe_trial_id"]
            if tid not in view.labels and "trial_id" not in (trial.config or {}):  # bayes: the sampled point
                view.label(tid, dict(trial.config or {}))
            view.result(tid, result)

    def _finish(self, trial: Any, error: bool) -> None:
        paths, view, mlflow = self._objects()
        tid = _trial_id(trial)
        if tid is None:  # a Bayesian point that reported nothing: infeasible (or failed at once)
            view.finished(trial.trial_id, "failed" if error else "infeasible", None)
            return
        file = paths.trials / f"{tid}.parquet"
        rows = read_rows_of(file)
        row = rows[0] if rows else None
        if row is not None and row["status"] in (RUNNING, FAILED) and not error:
            # Tune ended the trial without an error (early stopping): keep its last result.
            last = trial.last_result or {}
            row = trial_row(row, STOPPED, {"val_loss_macro": last.get("val_loss"), "train_loss": last.get("train_loss"),
                                           "steps": last.get("step"), "tokens": last.get("tokens")})
            write_row(file, row)
        elif row is not None and row["status"] == RUNNING and error:
            row = trial_row(row, FAILED, error=_error_of(trial))
            write_row(file, row)
        view.finished(tid, row["status"] if row else ("failed" if error else "infeasible"), row)
        mlflow.submit(tid)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=True)


def _trial_id(trial: Any) -> str | None:
    return (trial.config or {}).get("trial_id") or (trial.last_result or {}).get("moe_trial_id")


def _error_of(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-4000:] if path else "trial failed"
    except OSError:
        return "trial failed"


def _prepare_folder(paths: SweepPaths, sweep: SweepFile, restart: bool) -> None:
    if restart and paths.root.exists():
        cleanup_orphans(paths.pids)
        shutil.rmtree(paths.root)
    paths.make()
    shutil.copyfile(sweep.path, paths.snapshot)


def run_sweep(path: str | Path, options: RunOptions, console: Console | None = None) -> dict[str, int]:
    """Run (or resume) the sweep in `path`; returns trials per state at the end."""
    console = console or Console()
    sweep = SweepFile(path)  # every user mistake is caught here, before any compute
    plan = plan_sweep(sweep)
    spec = sweep.spec
    if spec.method != "bayes" and not plan.trials:
        reasons = list(dict.fromkeys(s.reason for s in plan.skipped))
        more = f" (and {len(reasons) - 3} more reasons)" if len(reasons) > 3 else ""
        raise ConfigError(f"{sweep.path}: every point of the sweep is infeasible, nothing to run: "
                          + "; ".join(reasons[:3]) + more)
    paths = SweepPaths(options.runs_dir, spec.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(paths.root / ".driver.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"another `moe-sweep run` is driving sweep '{spec.name}' ({paths.root})") from None
    try:
        cleaned = cleanup_orphans(paths.pids)  # what a killed driver of this sweep left running
        if cleaned:
            console.print(f"stopped {cleaned} Ray processes left by a previous driver of this sweep")
        _prepare_folder(paths, sweep, options.restart)
        states = trial_states(paths)  # read once: 2,000 per-trial files take seconds
        finished = sum(r["status"] in TERMINAL for r in states.values())
        pending = [t for t in plan.trials if states.get(t.trial_id, {}).get("status") not in TERMINAL]
        est_hours = sum(t.est_hours for t in pending) if spec.method != "bayes" else None
        write_json(paths.driver, {"pid": os.getpid(), "create_time": psutil.Process().create_time(),
                                   "started": time.time(), "planned": plan.planned_trials,
                                   "finished_before": finished, "est_hours": est_hours})
        return _run(plan, sweep, paths, pending, options, console)
    finally:
        lock.release()


def _run(plan: Plan, sweep: SweepFile, paths: SweepPaths, pending: list, options: RunOptions,
         console: Console) -> dict[str, int]:
    """MLflow catch-up, then Ray up, Tune over the `pending` trials (grid/random), Ray down."""
    spec = sweep.spec
    mlflow = MLflowSync(options.mlflow_uri or default_uri(options.runs_dir), spec.name, spec.description)
    if options.restart:
        mlflow.reset()
    mlflow.sync(paths)  # anything a previous run finished while MLflow was down
    if spec.method != "bayes" and not pending:
        console.print(f"{spec.name}: all {plan.planned_trials} trials are finished; nothing to run (--restart starts over)")
        return _counts(paths)

    _quiet_tune()
    session = start_ray(options.address, options.num_cpus, paths.pids, options.dashboard)
    try:
        if session.dashboard_url:
            console.print(f"Ray dashboard: {session.dashboard_url} (its REST API wants the token in {auth_token_path()}: "
                          f"curl -H \"Authorization: Bearer $(cat {auth_token_path()})\" ...)", soft_wrap=True)
        _check_resources(sweep)
        setup = _tune_setup(sweep, paths, pending, options, session.num_cpus)
        if setup is None:
            console.print(f"{spec.name}: all {spec.trials} points are sampled and finished")
            return _counts(paths)
        trainable, param_space, tune_config, total = setup
        finished = plan.planned_trials - len(pending) if spec.method != "bayes" else 0
        if finished:
            console.print(f"{spec.name}: {finished} of {plan.planned_trials} trials already finished; running {total}")
        metric = spec.metrics[0]
        view = LiveView(console, spec.name, total, metric.name, metric.goal, session.dashboard_url)
        for t in pending if spec.method != "bayes" else ():
            view.label(t.trial_id, t.params, t.seed if len(spec.seed_list) > 1 else None)
        run_config = tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(paths.ray), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.retries),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[ResultsCallback(paths, view, mlflow)],
        )
        mlflow.start_background(paths)
        try:
            with view:
                tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config).fit()
        finally:
            mlflow.stop_background()
    finally:
        stop_ray(session, paths.pids)
    mlflow.sync_unlogged(paths)
    mlflow.close()
    if mlflow.failed:
        console.print(f"[yellow]MLflow not updated ({mlflow.failed}); results are in Parquet, "
                      f"and the next run syncs them[/yellow]")
    counts = _counts(paths)
    console.print(f"{spec.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                  + f" -> {paths.root}")
    return counts


def _quiet_tune() -> None:
    # Tune's console reporter is replaced by the live view (verbose=0 alone still prints a header).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A Bayesian point that cannot be FLOP-matched ends without a result (Optuna: pruned);
    # Tune's strict check would call that an error.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Trial errors are recorded in the trials table and shown by the live view; Tune's own
    # log lines (a traceback per failed attempt) would bury the view.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    # Tune's own CSV/JSON/TensorBoard result files: nothing reads them (results are our Parquet
    # and MLflow), and writing them is the largest per-trial cost after MLflow (bench:
    # orchestrator_overhead.py, 4-8 ms per trial on 2 cores).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


def _check_resources(sweep: SweepFile) -> None:
    """A worker that asks for more than the whole cluster has would wait forever: say so."""
    import ray

    r, have = sweep.spec.resources, ray.cluster_resources()
    for name, need in (("CPU", r.cpus), ("GPU", r.gpus)):
        if need > have.get(name, 0.0):
            raise ConfigError(f"{sweep.path}: resources: each worker needs {need:g} {name}s but the Ray cluster has "
                              f"{have.get(name, 0.0):g}; lower resources.{name.lower()}s or join a bigger cluster (--address)")


def _tune_setup(
    sweep: SweepFile, paths: SweepPaths, pending: list, options: RunOptions, cluster_cpus: float
) -> tuple[Any, dict[str, Any], Any, int] | None:
    """The trainable, search space, TuneConfig and trial count for the sweep's method; None when a
    Bayesian sweep has sampled and finished every point already."""
    spec, r = sweep.spec, sweep.spec.resources
    per_trial_cpus = r.cpus * r.workers
    fit = max(1, int(cluster_cpus // per_trial_cpus)) if per_trial_cpus else 1
    concurrent = min(spec.max_concurrent or fit, fit)
    ctx = TrialContext(
        runs_dir=str(paths.runs), sweep=spec.name, method=spec.method, sweep_file=str(paths.snapshot),
        seed=spec.seed_list[0], param_names=tuple(spec.parameters), threads=max(1, int(r.cpus)),
        workers=r.workers, gpus_per_worker=r.gpus, cpus_per_worker=r.cpus, noop=options.noop,
    )
    # A multi-worker trial's own process only drives Ray Train's workers, which hold the
    # resources; Tune needs a non-empty request, so it asks for a token amount of memory.
    trial_resources = {"cpu": r.cpus, "gpu": r.gpus} if r.workers == 1 else {"cpu": 0, "memory": 1}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources)
    metric = spec.metrics[0]
    scheduler = None
    if spec.early_stopping:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            metric=metric.name, mode=metric.mode, time_attr="evals", grace_period=spec.early_stopping.grace_period,
            reduction_factor=spec.early_stopping.reduction_factor, max_t=10**9,
        )
    if spec.method == "bayes":
        from orchestrator.search_space import optuna_searcher, search_space

        searcher, remaining = optuna_searcher(spec, paths)
        if remaining == 0:
            return None
        return trainable, search_space(spec), tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=remaining, max_concurrent_trials=concurrent,
            reuse_actors=True), remaining
    # Tune's configs carry only trial ids (its experiment state is saved often, and grows with
    # config size); each trial reads its resolved plan from runs/<sweep>/plan/.
    for t in pending:
        write_json(paths.plan / f"{t.trial_id}.json", trial_meta(t, spec.method))
    return trainable, {"trial_id": tune.grid_search([t.trial_id for t in pending])}, tune.TuneConfig(
        scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=True,
        trial_name_creator=lambda t: t.config["trial_id"], trial_dirname_creator=lambda t: t.config["trial_id"],
    ), len(pending)


def _counts(paths: SweepPaths) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in read_rows(paths.trials):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts

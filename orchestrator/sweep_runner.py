"""`moe-sweep run PATH...`: plan sweeps, then run their trials as one queue of Ray Tune trials.

One command runs one sweep YAML, a folder of them or several: every sweep's pending trials join
one Tune run, longest planned first (so the last trials to start are short and the tail is
short), each trial asking the cluster for its own shape (`orchestrator.shapes`: its GPUs as a
placement group, on one node when it fits one). Each trial's rows still go to its own sweep's
tables and MLflow experiment.

Resuming is by trial id, per sweep. Every run plans the YAMLs again and hands Tune only the trials
without a finished row (`results.TERMINAL`); each of those resumes from its own checkpoint in
`runs/<sweep>/trial_runs/<id>/`. So a second run after the driver was killed re-runs nothing
that finished and continues what was interrupted, and an extended YAML runs only its new ids.
Bayesian sweeps (which sample adaptively, one Optuna study each) run alone, keep their study in
`runs/<sweep>/optuna.db` and sample only the points still missing. `--restart` deletes the
sweeps' folders and starts over.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from contextlib import ExitStack
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
from orchestrator.mlflow_sync import MLflowQueue, MLflowSync, default_uri
from orchestrator.planned import PlannedTrial
from orchestrator.planner import Plan, SweepFile, plan_sweep, sweep_files
from orchestrator.ray_session import auth_token_path, cleanup_orphans, start_ray, stop_ray
from orchestrator.repair import repair
from orchestrator.results import (FAILED, RUNNING, STOPPED, TERMINAL, DamagedFile, SweepPaths, read_rows, read_rows_of, trial_row,
                                  trial_states, write_row)
from orchestrator.actor_reuse import reuse_own_starting_actors
from orchestrator.cluster_model import Job, best_queue, start_gaps
from orchestrator.cluster_model import queue_key as queue_key_of
from orchestrator.queue_search import QueueGate, QueueSearcher
from orchestrator.shapes import TrialShape
from orchestrator.trial_fn import TrialContext, queue_key, run_trial, split_key


# Tune pickles its run config (callbacks included) into its experiment state; the callback holds
# only a key into this table of driver-side objects (live view, MLflow client), which cannot be pickled.
_DRIVER_OBJECTS: dict[str, "_Driver"] = {}


@dataclass
class RunOptions:
    runs_dir: str = "runs"
    address: str | None = None  # None: a local Ray instance
    restart: bool = False
    mlflow_uri: str | None = None  # None: sqlite under runs/
    num_cpus: float | None = None  # local Ray only; None: all cores
    dashboard: bool = True
    noop: bool = False  # trials skip training (bench/orchestrator_overhead.py measures the rest)
    simulate: float | None = None  # trials hold their shape for planned hours x this, no training


@dataclass
class _Sweep:
    """One sweep of the queue: its file, plan, folders and MLflow mirror."""

    sweep: SweepFile
    plan: Plan
    paths: SweepPaths
    pending: list[PlannedTrial]
    mlflow: MLflowSync | None = None

    @property
    def name(self) -> str:
        return self.sweep.spec.name


@dataclass
class _Driver:
    sweeps: dict[str, _Sweep]
    view: LiveView
    mlflow: MLflowQueue
    gate: QueueGate | None = None  # grid and random queues: which handed-out trials wait to start


class ResultsCallback(Callback):
    """Driver side: keep the live view current, write the rows a trial could not write itself
    (stopped early by ASHA, or its process died), mirror finished trials to MLflow."""

    def __init__(self, key: str, driver: _Driver) -> None:
        self.key = key
        _DRIVER_OBJECTS[key] = driver

    def _driver(self) -> _Driver:
        return _DRIVER_OBJECTS[self.key]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if "moe_trial_id" in result:
            view = self._driver().view
            key = queue_key(result.get("moe_sweep", ""), result["moe_trial_id"])
            if key not in view.labels and "trial" not in (trial.config or {}):  # bayes: the sampled point
                view.label(key, dict(trial.config or {}))
            view.result(key, result)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started(trial)

    def _started(self, trial: Any) -> None:
        gate = self._driver().gate
        if gate is not None and "trial" in (trial.config or {}):
            gate.started(trial.config["trial"])

    def _finish(self, trial: Any, error: bool) -> None:
        self._started(trial)  # one that ended before it ran no longer waits either
        driver = self._driver()
        key = _queue_key_of(trial)
        if key is None:  # a Bayesian point that reported nothing: infeasible (or failed at once)
            driver.view.finished(trial.trial_id, "failed" if error else "infeasible", None)
            return
        name, tid = split_key(key)
        paths = driver.sweeps[name].paths
        file = paths.trials / f"{tid}.parquet"
        try:
            rows = read_rows_of(file)
        except DamagedFile:  # damaged from outside mid-run: the trial's outcome is what Tune saw
            rows = []
        row = rows[0] if rows else None
        if row is not None and row["status"] in (RUNNING, FAILED) and not error:
            # Tune ended the trial without an error (early stopping): keep its last result.
            last = trial.last_result or {}
            row = trial_row(row, STOPPED, {"val_loss": last.get("val_loss"), "train_loss": last.get("train_loss"),
                                           "steps": last.get("step"), "tokens": last.get("tokens")})
            write_row(file, row)
        elif row is not None and row["status"] == RUNNING and error:
            row = trial_row(row, FAILED, error=_error_of(trial))
            write_row(file, row)
        driver.view.finished(key, row["status"] if row else ("failed" if error else "infeasible"), row)
        driver.mlflow.submit(name, tid)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=True)


def _queue_key_of(trial: Any) -> str | None:
    """`sweep/trial_id` of a Tune trial: from its config (grid/random) or its reports (bayes)."""
    if "trial" in (trial.config or {}):
        return trial.config["trial"]
    last = trial.last_result or {}
    return queue_key(last["moe_sweep"], last["moe_trial_id"]) if "moe_trial_id" in last else None


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


def load_sweeps(paths: list[str | Path]) -> list[SweepFile]:
    """Every sweep YAML of `paths` (files or folders), parsed: each user mistake is one
    `ConfigError` here, before any compute. Names must be unique; a Bayesian sweep runs alone."""
    files = list(dict.fromkeys(f.resolve() for p in paths for f in sweep_files(p)))
    sweeps, names = [], {}
    for file in files:
        sweep = SweepFile(file)
        if sweep.spec.name in names:
            raise sweep.error(("name",), f"duplicate sweep name '{sweep.spec.name}' (also in {names[sweep.spec.name]})")
        names[sweep.spec.name] = file
        sweeps.append(sweep)
    bayes = [s for s in sweeps if s.spec.method == "bayes"]
    if bayes and len(sweeps) > 1:
        raise bayes[0].error(("method",), "a bayes sweep samples adaptively from its own Optuna study and runs alone: "
                             f"`moe-sweep run {bayes[0].path}`")
    return sweeps


def run_sweep(path: str | Path, options: RunOptions, console: Console | None = None) -> dict[str, int]:
    """Run (or resume) the sweep(s) in `path`; returns trials per state at the end (summed over
    the sweeps of a folder)."""
    total: dict[str, int] = {}
    for counts in run_sweeps([path], options, console).values():
        for state, n in counts.items():
            total[state] = total.get(state, 0) + n
    return total


def run_sweeps(paths: list[str | Path], options: RunOptions, console: Console | None = None) -> dict[str, dict[str, int]]:
    """Run (or resume) every sweep of `paths` as one queue; returns each sweep's trials per state."""
    console = console or Console()
    if options.simulate is not None and not options.simulate > 0:
        raise ConfigError(f"--simulate takes a positive time scale (planned hours x SCALE), not {options.simulate}")
    sweeps = []
    for sweep in load_sweeps(paths):
        plan = plan_sweep(sweep)
        if sweep.spec.method != "bayes" and not plan.trials:
            reasons = list(dict.fromkeys(s.reason for s in plan.skipped))
            more = f" (and {len(reasons) - 3} more reasons)" if len(reasons) > 3 else ""
            raise ConfigError(f"{sweep.path}: every point of the sweep is infeasible, nothing to run: "
                              + "; ".join(reasons[:3]) + more)
        sweeps.append(_Sweep(sweep, plan, SweepPaths(options.runs_dir, sweep.spec.name), []))
    _check_one_search({s.name: s for s in sweeps})
    with ExitStack() as stack:
        for s in sweeps:
            s.paths.root.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(s.paths.root / ".driver.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ConfigError(f"another `moe-sweep run` is driving sweep '{s.name}' ({s.paths.root})") from None
            stack.callback(lock.release)
        for s in sweeps:
            cleaned = cleanup_orphans(s.paths.pids)  # what a killed driver of this sweep left running
            if cleaned:
                console.print(f"stopped {cleaned} Ray processes left by a previous driver of sweep {s.name}")
            _prepare_folder(s.paths, s.sweep, options.restart)
            repair(s.paths, lambda line: console.print(line, soft_wrap=True, markup=False))
            states = trial_states(s.paths)  # read once: 2,000 per-trial files take seconds
            finished = sum(r["status"] in TERMINAL for r in states.values())
            s.pending = [t for t in s.plan.trials if states.get(t.trial_id, {}).get("status") not in TERMINAL]
            est_hours = sum(t.est_hours for t in s.pending) if s.sweep.spec.method != "bayes" else None
            write_json(s.paths.driver, {"pid": os.getpid(), "create_time": psutil.Process().create_time(),
                                        "started": time.time(), "planned": s.plan.planned_trials,
                                        "finished_before": finished, "est_hours": est_hours,
                                        "queue": [o.name for o in sweeps], "simulated": options.simulate is not None})
        _run({s.name: s for s in sweeps}, options, console)
    return {s.name: _counts(s.paths) for s in sweeps}


def _run(sweeps: dict[str, _Sweep], options: RunOptions, console: Console) -> None:
    """MLflow catch-up, then Ray up, Tune over the pending trials, Ray down."""
    for s in sweeps.values():
        s.mlflow = MLflowSync(options.mlflow_uri or default_uri(options.runs_dir), s.name, s.sweep.spec.description)
        if options.restart:
            s.mlflow.reset()
        s.mlflow.sync(s.paths)  # anything a previous run finished while MLflow was down
    bayes = next((s for s in sweeps.values() if s.sweep.spec.method == "bayes"), None)
    if bayes is None and not any(s.pending for s in sweeps.values()):
        for s in sweeps.values():
            console.print(f"{s.name}: all {s.plan.planned_trials} trials are finished; nothing to run (--restart starts over)")
        return

    _quiet_tune()
    first = next(iter(sweeps.values()))
    session = start_ray(options.address, options.num_cpus, first.paths.pids, options.dashboard)
    for s in list(sweeps.values())[1:]:  # each sweep's folder knows what to clean up after a kill
        if first.paths.pids.exists():
            shutil.copyfile(first.paths.pids, s.paths.pids)
    mlflow = MLflowQueue({s.name: (s.mlflow, s.paths) for s in sweeps.values()})
    try:
        if session.dashboard_url:
            console.print(f"Ray dashboard: {session.dashboard_url} (its REST API wants the token in {auth_token_path()}: "
                          f"curl -H \"Authorization: Bearer $(cat {auth_token_path()})\" ...)", soft_wrap=True)
        for s in sweeps.values():
            _check_resources(s)
        setup = _tune_setup(sweeps, bayes, options, session.num_cpus)
        if setup is None:
            console.print(f"{bayes.name}: all {bayes.sweep.spec.trials} points are sampled and finished")
            return
        trainable, param_space, tune_config, total, order, gate = setup
        if order and total > 1:
            console.print(f"queue: {total:,} trials, {order}")
        for s in sweeps.values():
            finished = s.plan.planned_trials - len(s.pending) if s.sweep.spec.method != "bayes" else 0
            if finished:
                console.print(f"{s.name}: {finished} of {s.plan.planned_trials} trials already finished; running {len(s.pending)}")
        metric = first.sweep.spec.metrics[0]
        title = first.name if len(sweeps) == 1 else f"{len(sweeps)} sweeps ({', '.join(sweeps)})"
        view = LiveView(console, title, total, metric.name, metric.goal, session.dashboard_url)
        for s in sweeps.values():
            seeds = len(s.sweep.spec.seed_list) > 1
            for t in s.pending if s.sweep.spec.method != "bayes" else ():
                params = t.params if len(sweeps) == 1 else {"sweep": s.name, **t.params}
                view.label(queue_key(s.name, t.trial_id), params, t.seed if seeds else None)
        retries = max(s.sweep.spec.retries for s in sweeps.values())
        run_config = tune.RunConfig(
            name=f"run-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(_tune_storage(sweeps, options)), verbose=0,
            failure_config=tune.FailureConfig(max_failures=retries),
            callbacks=[ResultsCallback(str(first.paths.root), _Driver(sweeps, view, mlflow, gate))],
        )
        reuse_own_starting_actors()  # see actor_reuse.py: Tune would kill actors already starting
        mlflow.start()
        try:
            with view:
                tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config).fit()
        finally:
            mlflow.stop()
    finally:
        stop_ray(session, first.paths.pids)
    for s in sweeps.values():
        s.mlflow.sync_unlogged(s.paths)
        s.mlflow.close()
        if s.mlflow.failed:
            console.print(f"[yellow]MLflow not updated for {s.name} ({s.mlflow.failed}); results are in Parquet, "
                          f"and the next run syncs them[/yellow]")
        counts = _counts(s.paths)
        console.print(f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" -> {s.paths.root}")


def _tune_storage(sweeps: dict[str, _Sweep], options: RunOptions) -> Path:
    """Tune's experiment folder: the sweep's own, or one per queue of several sweeps."""
    if len(sweeps) == 1:
        return next(iter(sweeps.values())).paths.ray
    return Path(options.runs_dir).resolve() / ".queues" / "+".join(sorted(sweeps))[:200]


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
    # Tune's own experiment state (every trial, as JSON) is not how runs resume (the trials
    # tables are); with 2,358 trials each save held Tune's loop for 20-50 s, no trial starting
    # meanwhile. Every 15 minutes is plenty for what reads it (the dashboard's history).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "900")


def _check_resources(s: _Sweep) -> None:
    """A trial that asks for more than the cluster has would wait forever: say so."""
    import ray

    have = ray.cluster_resources()
    r = s.sweep.spec.resources
    for name, need in (("CPU", r.cpus), ("GPU", r.gpus)):
        if need > have.get(name, 0.0):
            raise ConfigError(f"{s.sweep.path}: resources: each worker needs {need:g} {name}s but the Ray cluster has "
                              f"{have.get(name, 0.0):g}; lower resources.{name.lower()}s or join a bigger cluster (--address)")
    widest = max(s.pending or ([s.plan.estimate] if s.plan.estimate else []), key=lambda t: t.shape.gpus, default=None)
    if widest is not None and widest.shape.gpus > have.get("GPU", 0.0):
        raise ConfigError(f"{s.sweep.path}: trial {widest.trial_id} is planned on {widest.shape.gpus:g} GPUs but the Ray "
                          f"cluster has {have.get('GPU', 0.0):g}; join a bigger cluster (--address) or set resources.workers")


def trial_resources(shape: TrialShape) -> tune.PlacementGroupFactory:
    """What Tune reserves for a trial before it starts: all of its workers' resources as one
    placement group, placed as a gang (`shape.placement`: one node, or the fewest nodes), so a
    wide trial waits in Tune's queue like a narrow one. The trial's own process runs in bundle 0
    (rank 0, or the whole of a simulated trial); `orchestrator.worker_group` puts the other ranks
    in the other bundles."""
    return tune.PlacementGroupFactory([shape.worker_bundle() for _ in range(shape.workers)], strategy=shape.placement)


# Queued trials of mixed shapes that wait for their placement groups at once
# (`orchestrator.queue_search`): Tune's default is hundreds, and with hundreds pending, narrow
# trials far down the queue took, GPU by GPU, the node a wide trial at its head waited for
# (measured on the simulated study: 8-GPU trials waited many times their planned time). A few,
# not one: each start (placement, the trial's process) then overlaps the others'.
LOOKAHEAD = 8
_USER_PENDING_LIMIT = os.environ.get("TUNE_MAX_PENDING_TRIALS_PG")  # a user's own setting wins


def _pending_limit(n: int) -> None:
    """How many trials Tune keeps waiting at once (read when the Tuner starts)."""
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = _USER_PENDING_LIMIT or str(n)


def queue_order(
    trials: list[tuple[str, PlannedTrial]], cluster_gpus: float = 0.0, scale: float | None = None
) -> tuple[list[tuple[str, PlannedTrial]], str]:
    """The queue and how it was chosen. Longest first (trials of a whole node or more first,
    then the rest, longest planned first within each: `orchestrator.cluster_model.queue_key`):
    whole-node trials start while the cluster is empty and free whole nodes for each other, and
    the last trials to start are the shortest, so the tail is short. On a GPU cluster, whichever
    of that and widest first the cluster model finishes sooner on its `cluster_gpus`
    (`cluster_model.best_queue`), the driver's time per start and a new trial actor's counted at
    the run's speed (`scale`: a simulation's seconds per planned second)."""
    ordered = sorted(trials, key=lambda st: (*queue_key_of(st[1].est_hours, st[1].shape.gpus, _node_gpus(st[1])),
                                             st[0], st[1].trial_id))
    node = max((_node_gpus(t) for _, t in trials), default=0.0)
    if node < 1 or cluster_gpus < node:  # CPU trials, or no GPU count to plan on
        return ordered, "longest first"
    nodes = int(cluster_gpus // node)
    jobs = [Job(t.est_hours, math.ceil(t.shape.gpus), tag=(name, t)) for name, t in ordered]
    name, queue, s = best_queue(jobs, nodes, int(node), *start_gaps(scale))
    return [j.tag for j in queue], (f"{name} (cluster model: {s.makespan:,.1f} h on {nodes * int(node)} GPUs, "
                                    f"bound {s.bound:,.1f} h)")


def _node_gpus(t: PlannedTrial) -> float:
    return t.shape.workers_per_node * t.shape.gpus_per_worker


def _tune_setup(
    sweeps: dict[str, _Sweep], bayes: _Sweep | None, options: RunOptions, cluster_cpus: float
) -> tuple[Any, dict[str, Any], Any, int, str | None, QueueGate | None] | None:
    """The trainable, search space, TuneConfig, trial count, how the queue was ordered and its
    gate (`orchestrator.queue_search`); None when a Bayesian sweep has sampled and finished every
    point already."""
    ctx = TrialContext(
        runs_dir=str(Path(options.runs_dir).resolve()), noop=options.noop, simulate=options.simulate,
        sweeps={s.name: (s.sweep.spec.method, str(s.paths.snapshot), s.sweep.spec.seed_list[0], tuple(s.sweep.spec.parameters))
                for s in sweeps.values()},
    )
    limits = [s.sweep.spec.max_concurrent for s in sweeps.values() if s.sweep.spec.max_concurrent]
    concurrent = min(limits) if limits else None  # else: as many as the cluster holds
    scheduler = _scheduler(next(iter(sweeps.values())).sweep.spec)
    if bayes is not None:
        from orchestrator.search_space import optuna_searcher, search_space

        spec = bayes.sweep.spec
        searcher, remaining = optuna_searcher(spec, bayes.paths)
        if remaining == 0:
            return None
        fallback = bayes.plan.estimate.shape if bayes.plan.estimate else TrialShape(
            spec.resources.workers or 1, spec.resources.gpus, spec.resources.cpus, 1 << 30)
        resources = _PointResources(str(bayes.paths.snapshot), spec.seed_list[0], fallback)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), resources)
        _pending_limit(LOOKAHEAD)
        return trainable, search_space(spec), tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=remaining,
            max_concurrent_trials=concurrent or _fit(fallback, cluster_cpus), reuse_actors=True), remaining, None, None
    # Tune's configs carry only `sweep/trial_id` keys (its experiment state is saved often, and
    # grows with config size); each trial reads its resolved plan from runs/<sweep>/plan/.
    import ray

    queue, order = queue_order([(s.name, t) for s in sweeps.values() for t in s.pending],
                               ray.cluster_resources().get("GPU", 0.0), options.simulate)
    for name, t in queue:
        t.write(sweeps[name].paths.plan / f"{t.trial_id}.json")
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _QueueResources(queue))
    on_gpus = any(t.shape.gpus_per_worker for _, t in queue)
    width = {queue_key(name, t.trial_id): t.shape.gpus if on_gpus else t.shape.workers * t.shape.cpus_per_worker
             for name, t in queue}
    gate = QueueGate(width, ray.cluster_resources().get("GPU" if on_gpus else "CPU", 0.0), LOOKAHEAD)
    _pending_limit(gate.most_waiting)
    return trainable, {}, tune.TuneConfig(
        search_alg=QueueSearcher(list(width), gate), num_samples=len(queue),
        scheduler=scheduler, max_concurrent_trials=concurrent, reuse_actors=True,
        trial_name_creator=lambda t: t.config["trial"].replace("/", "-"),
        trial_dirname_creator=lambda t: t.config["trial"].replace("/", "-"),
    ), len(queue), order, gate


class _QueueResources:
    """Each queued trial's placement group, looked up by its `sweep/trial_id`. Tune unpickles
    this once per trial it creates, so it holds the few distinct shapes once and an index per
    trial: a table of 2,358 placement-group factories, unpickled for each of 2,358 trials, kept
    the driver busy for minutes before the first trial started."""

    def __init__(self, queue: list[tuple[str, PlannedTrial]]) -> None:
        self.shapes = list(dict.fromkeys(t.shape for _, t in queue))
        index = {shape: i for i, shape in enumerate(self.shapes)}
        self.of = {queue_key(name, t.trial_id): index[t.shape] for name, t in queue}

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        return trial_resources(self.shapes[self.of[config["trial"]]])


class _PointResources:
    """A Bayesian point's resources: the shape the planner gives the sampled point (Tune asks
    when it creates the trial), or the sweep's typical shape for a point that is infeasible."""

    def __init__(self, sweep_file: str, seed: int, fallback: TrialShape) -> None:
        self.sweep_file, self.seed, self.fallback = sweep_file, seed, fallback
        self._planner: Any = None

    def __call__(self, config: dict[str, Any]) -> tune.PlacementGroupFactory:
        from orchestrator.planner import Planner
        from orchestrator.study import Infeasible

        if self._planner is None:
            self._planner = Planner(SweepFile(self.sweep_file))
        names = self._planner.spec.parameters
        try:
            shape = self._planner.resolve({n: config[n] for n in names}, self.seed).shape
        except (Infeasible, ConfigError, KeyError):
            shape = self.fallback
        return trial_resources(shape)


def _fit(shape: TrialShape, cluster_cpus: float) -> int:
    per_trial = shape.cpus_per_worker * shape.workers
    return max(1, int(cluster_cpus // per_trial)) if per_trial else 1


def _check_one_search(sweeps: dict[str, _Sweep]) -> None:
    """One Tune run has one early-stopping scheduler: the queued sweeps must agree on it."""
    first = next(iter(sweeps.values()))
    for s in sweeps.values():
        if (s.sweep.spec.early_stopping, s.sweep.spec.metrics[0]) != (first.sweep.spec.early_stopping, first.sweep.spec.metrics[0]):
            raise ConfigError(f"{s.sweep.path}: early_stopping and metric differ from {first.sweep.path}'s; sweeps that stop "
                              "trials early run in one queue only with the same settings (run them separately)")


def _scheduler(spec: Any) -> Any:
    if not spec.early_stopping:
        return None
    from ray.tune.schedulers import ASHAScheduler

    metric = spec.metrics[0]
    return ASHAScheduler(
        metric=metric.name, mode=metric.mode, time_attr="evals", grace_period=spec.early_stopping.grace_period,
        reduction_factor=spec.early_stopping.reduction_factor, max_t=10**9,
    )


def _counts(paths: SweepPaths) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in read_rows(paths.trials):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts

"""MLflow mirror of a sweep's result tables: one experiment per sweep, a parent run for the sweep
and a child run per finished trial (params, step metrics in batches, tags).

Parquet is the source of truth. Syncing is idempotent: a trial whose child run is already
complete is skipped, a half-logged one is replaced, so running it again after MLflow was down
fills in what is missing. Any MLflow error is reported as a warning and never stops the sweep.
Ray's `MLflowLoggerCallback` is not used: it sends one request per metric and makes no parent run.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass
import warnings
from pathlib import Path
from typing import Any

from orchestrator.results import TERMINAL, DamagedFile, SweepPaths, read_rows, read_rows_of

BATCH = 1000  # MLflow's limit of metrics per log_batch call
_SKIP_PARAMS = ("config_json", "probe_json", "error", "node", "updated_at", "status", "trial_id")
_RESULTS = ("val_loss", "train_loss", "perplexity", "acc_", "probe_loss_increase", "probe_acc_drop", "wall_seconds",
            "tokens_per_second", "steps", "tokens")


def default_uri(runs_dir: str | Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


@dataclass
class _Logged:
    run_id: str
    status: str | None
    logged: bool = True


class MLflowSync:
    def __init__(self, uri: str, sweep: str, description: str = "") -> None:
        self.uri, self.sweep, self.description = uri, sweep, description
        self.client: Any = None
        self._runs: dict[str, _Logged] | None = None
        self.parent_id: str | None = None
        self.failed: str | None = None

    def _connect(self) -> bool:
        if self.failed:
            return False
        if self.client is not None:
            return True
        try:
            # No usage telemetry: nothing outside the cluster is contacted.
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            # An unreachable server should cost seconds, not MLflow's default minutes of retries.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for name in ("mlflow", "alembic"):  # schema-creation chatter on a new store
                    logging.getLogger(name).setLevel(logging.WARNING)
                from mlflow.tracking import MlflowClient

                for name in ("mlflow", "alembic"):  # mlflow sets up its loggers on import
                    logging.getLogger(name).setLevel(logging.WARNING)

                client = MlflowClient(tracking_uri=self.uri)
                exp = client.get_experiment_by_name(self.sweep)
                exp_id = exp.experiment_id if exp else client.create_experiment(self.sweep)
                parents = client.search_runs([exp_id], "tags.`moe_sweep.role` = 'sweep'", max_results=1)
                if parents:
                    self.parent_id = parents[0].info.run_id
                else:
                    run = client.create_run(exp_id, run_name=self.sweep, tags={
                        "moe_sweep.role": "sweep", "mlflow.note.content": self.description})
                    self.parent_id = run.info.run_id
                self.client, self.exp_id = client, exp_id
            return True
        except Exception as err:  # unreachable server, locked database, ...
            self._fail(err)
            return False

    def _fail(self, err: Exception) -> None:
        self.failed = f"{type(err).__name__}: {err}".splitlines()[0][:300]

    def reset(self) -> None:
        """Delete the sweep's trial runs (for `--restart`): the tables they mirrored are gone."""
        if not self._connect():
            return
        try:
            for run in self.client.search_runs([self.exp_id], "tags.`moe_sweep.role` = 'trial'", max_results=50000):
                self.client.delete_run(run.info.run_id)
            self._runs = {}
        except Exception as err:
            self._fail(err)

    def _logged(self) -> dict[str, Any]:
        """trial_id -> its child run, read once per driver (then kept up to date here)."""
        if self._runs is None:
            self._runs = {
                r.data.tags.get("trial_id"): _Logged(r.info.run_id, r.data.tags.get("status"), r.data.tags.get("logged") == "1")
                for r in self.client.search_runs([self.exp_id], "tags.`moe_sweep.role` = 'trial'", max_results=50000)
            }
        return self._runs

    def sync_unlogged(self, paths: SweepPaths) -> int:
        """Log the trials with a row but no run yet (those the background thread never saw, like
        Bayesian points that were infeasible), reading only their rows: rows already mirrored by
        this driver cannot change after their trial finished."""
        if not self._connect():
            return 0
        try:
            missing = sorted({p.stem for p in paths.trials.glob("*.parquet")} - set(self._logged()))
        except Exception as err:
            self._fail(err)
            return 0
        return self.sync(paths, missing) if missing else 0

    def sync(self, paths: SweepPaths, trial_ids: list[str] | None = None) -> int:
        """Log finished trials (all of the sweep's, or `trial_ids`) that MLflow does not have yet;
        returns how many were logged."""
        if not self._connect():
            return 0
        logged = 0
        try:
            if trial_ids is None:
                rows = read_rows(paths.trials)
            else:
                rows = [r for tid in trial_ids for r in _rows_of(paths.trials / f"{tid}.parquet")]
            runs = self._logged()
            for row in rows:
                if row.get("status") not in TERMINAL and row.get("status") != "failed":
                    continue
                run = runs.get(row["trial_id"])
                if run is not None and run.logged and run.status == row["status"]:
                    continue
                if run is not None:
                    self.client.delete_run(run.run_id)
                runs[row["trial_id"]] = self._log_trial(row, paths)
                logged += 1
        except Exception as err:
            self._fail(err)
        return logged

    def _log_trial(self, row: dict[str, Any], paths: SweepPaths) -> Any:
        """One child run in three calls: create (tags), one batch (params, metrics, the `logged`
        tag last written with them), terminate. Step histories over 1000 values take more batches.

        Batches are synchronous. MLflow's `log_batch(synchronous=False)` was measured and is
        slower here: `set_terminated` shuts MLflow's asynchronous logging down (waiting for the
        queue, then tearing its thread pools down for the next run to rebuild), 42 ms per trial
        (bench/orchestrator_overhead.py, 2,000 no-op trials). The driver's own thread keeps
        Parquet reads and run creation off Tune's event loop."""
        from mlflow.entities import Metric, Param, RunTag

        tid = row["trial_id"]
        run = self.client.create_run(self.exp_id, run_name=tid, tags={
            "mlflow.parentRunId": self.parent_id, "moe_sweep.role": "trial", "trial_id": tid,
            "status": row["status"], "sweep": self.sweep})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        params, metrics = [], []
        for key, value in row.items():
            if value is None or key in _SKIP_PARAMS:
                continue
            if key.startswith(_RESULTS):  # final results: metrics (val_loss/<set> included)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
                    metrics.append(Metric(f"final.{key.replace('/', '.')}", float(value), now, 0))
            else:
                params.append(Param(key, str(value)[:500]))
        metrics += self._step_metrics(paths.steps / f"{tid}.parquet")
        tags = [RunTag("error", str(row["error"])[:5000])] if row.get("error") else []
        # Everything but the last batch first; the last carries the `logged` tag, so a run
        # interrupted half-way is never taken for a complete one.
        chunks = [metrics[i:i + BATCH] for i in range(0, len(metrics), BATCH)] or [[]]
        for chunk in chunks[:-1]:
            self.client.log_batch(run_id, metrics=chunk)
        for i in range(100, len(params), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        self.client.log_batch(run_id, metrics=chunks[-1], params=params[:100], tags=tags + [RunTag("logged", "1")])
        self.client.set_terminated(run_id, "FINISHED" if row["status"] in ("completed", "stopped", "infeasible") else "FAILED")
        return _Logged(run_id, row["status"])

    @staticmethod
    def _step_metrics(path: Path) -> list:
        from mlflow.entities import Metric

        if not path.exists():
            return []
        out = []
        now = int(time.time() * 1000)
        try:
            rows = read_rows_of(path, "steps")
        except DamagedFile:  # the next `moe-sweep run` repairs it, and logs the trial again
            return []
        for r in rows:
            step = int(r.get("step") or 0)
            for k, v in r.items():
                if k in ("trial_id", "step") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if k.startswith("routing/L") or not math.isfinite(float(v)):
                    continue  # per-layer detail stays in Parquet
                out.append(Metric(k.replace("/", "."), float(v), now, step))
        return out

    def close(self, status: str = "FINISHED") -> None:
        if self.client is None or self.parent_id is None:
            return
        try:
            self.client.set_terminated(self.parent_id, status)
        except Exception as err:
            self._fail(err)



class MLflowQueue:
    """One background thread logging the finished trials of several sweeps (one queue of a
    `moe-sweep run` over a folder), each to its own sweep's experiment: the Tune loop only
    enqueues `(sweep, trial_id)`. One thread, so a SQLite store sees one writer."""

    def __init__(self, syncs: dict[str, tuple[MLflowSync, SweepPaths]]) -> None:
        self.syncs = syncs
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain, name="mlflow-sync", daemon=True)
        self._thread.start()

    def submit(self, sweep: str, trial_id: str) -> None:
        self._queue.put((sweep, trial_id))

    def _drain(self) -> None:
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get())
            by_sweep: dict[str, list[str]] = {}
            for item in batch:
                if item is not None:
                    by_sweep.setdefault(item[0], []).append(item[1])
            for name, ids in by_sweep.items():
                sync, paths = self.syncs[name]
                sync.sync(paths, ids)
            if None in batch:
                return

    def stop(self) -> None:
        """Log what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def _rows_of(file: Path) -> list[dict[str, Any]]:
    try:
        return read_rows_of(file)
    except DamagedFile:  # logged once `moe-sweep run` has repaired it
        return []

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
import time
import warnings
from pathlib import Path
from typing import Any

from orchestrator.results import TERMINAL, SweepPaths, read_rows

BATCH = 1000  # MLflow's limit of metrics per log_batch call
_SKIP_PARAMS = ("config_json", "probe_json", "error", "node", "updated_at", "status", "trial_id")
_RESULTS = ("val_loss", "train_loss", "perplexity", "probe_loss_increase", "wall_seconds", "tokens_per_second", "steps", "tokens")


def default_uri(runs_dir: str | Path) -> str:
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


class MLflowSync:
    def __init__(self, uri: str, sweep: str, description: str = "") -> None:
        self.uri, self.sweep, self.description = uri, sweep, description
        self.client: Any = None
        self.parent_id: str | None = None
        self.failed: str | None = None

    def _connect(self) -> bool:
        if self.failed:
            return False
        if self.client is not None:
            return True
        try:
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
        except Exception as err:
            self._fail(err)

    def sync(self, paths: SweepPaths) -> int:
        """Log every finished trial that MLflow does not have yet; returns how many were logged."""
        if not self._connect():
            return 0
        logged = 0
        try:
            existing = {
                r.data.tags.get("trial_id"): r
                for r in self.client.search_runs([self.exp_id], "tags.`moe_sweep.role` = 'trial'", max_results=50000)
            }
            for row in read_rows(paths.trials):
                if row.get("status") not in TERMINAL and row.get("status") != "failed":
                    continue
                run = existing.get(row["trial_id"])
                if run is not None and run.data.tags.get("logged") == "1" and run.data.tags.get("status") == row["status"]:
                    continue
                if run is not None:
                    self.client.delete_run(run.info.run_id)
                self._log_trial(row, paths)
                logged += 1
        except Exception as err:
            self._fail(err)
        return logged

    def _log_trial(self, row: dict[str, Any], paths: SweepPaths) -> None:
        from mlflow.entities import Metric, Param

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
        for i in range(0, max(len(params), 1), 100):
            self.client.log_batch(run_id, params=params[i:i + 100])
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + BATCH])
        if row.get("error"):
            self.client.set_tag(run_id, "error", str(row["error"])[:5000])
        self.client.set_tag(run_id, "logged", "1")
        self.client.set_terminated(run_id, "FINISHED" if row["status"] in ("completed", "stopped", "infeasible") else "FAILED")

    @staticmethod
    def _step_metrics(path: Path) -> list:
        from mlflow.entities import Metric

        if not path.exists():
            return []
        import pyarrow.parquet as pq

        out = []
        now = int(time.time() * 1000)
        for r in pq.read_table(path).to_pylist():
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


"""A sweep's result tables: the contract `analysis` reads (schema in docs/results.md).

Layout under `runs/<sweep>/`:
- `tables/trials/<trial_id>.parquet`: one row per trial (state, resolved parameters, results);
- `tables/steps/<trial_id>.parquet`: that trial's per-step rows;
- `trial_runs/<trial_id>/`: the trainer's own folder (config, metrics, checkpoints, summary).

Every file is written to a temporary name and renamed into place, and a trial's row is keyed by
its id, so after any sequence of crashes and resumes there is exactly one row per trial: the
latest write wins. Read a table with `read_table(runs, "trials")`, DuckDB
(`read_parquet('runs/*/tables/trials/*.parquet', union_by_name = true)`) or pandas.

A file damaged from outside (truncated, empty, not Parquet, another table's) is a
`DamagedFile`: readers leave it out and say so, `moe-sweep run` repairs it (`orchestrator.repair`).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from moe_core.files import error_line, parquet_damage, write_parquet

if TYPE_CHECKING:  # the driver and the trials pass them; `analysis` reads tables without them
    from moe_core.trial import TrialConfig
    from orchestrator.planned import PlannedTrial

# Trial states. Terminal ones are never re-run by a resumed sweep; `failed` trials are retried
# (from their last checkpoint) by the next `moe-sweep run`.
RUNNING, COMPLETED, DIVERGED, FAILED, STOPPED, INFEASIBLE = "running", "completed", "diverged", "failed", "stopped", "infeasible"
TERMINAL = frozenset({COMPLETED, DIVERGED, STOPPED, INFEASIBLE})
STATES = (RUNNING, COMPLETED, DIVERGED, FAILED, STOPPED, INFEASIBLE)


class SweepPaths:
    """Where one sweep's files live."""

    def __init__(self, runs_dir: str | Path, sweep: str) -> None:
        self.runs = Path(runs_dir).resolve()
        self.root = self.runs / sweep
        self.trials = self.root / "tables" / "trials"
        self.steps = self.root / "tables" / "steps"
        self.trial_runs = self.root / "trial_runs"
        self.plan = self.root / "plan"  # <trial_id>.json: what each planned trial runs
        self.ray = self.root / "ray"  # Ray Tune's experiment folders
        self.optuna = self.root / "optuna.db"
        self.snapshot = self.root / "sweep.yaml"  # the YAML the latest run used
        self.pids = self.root / "ray_pids.json"
        self.driver = self.root / "driver.json"

    def trial_dir(self, trial_id: str) -> Path:
        return self.trial_runs / trial_id

    def make(self) -> None:
        for p in (self.trials, self.steps, self.trial_runs, self.ray, self.plan):
            p.mkdir(parents=True, exist_ok=True)


_S, _F, _I = pa.string(), pa.float64(), pa.int64()
# The trials table's fixed columns and their types, written in every row (null where unknown)
# so that per-trial files of any state and any sweep read back as one table.
TRIALS_SCHEMA: dict[str, pa.DataType] = {
    "trial_id": _S, "sweep": _S, "status": _S, "scale": _S, "seed": _I, "method": _S,
    "layout": _S, "sparsity": _F, "num_experts": _I, "top_k": _I, "granularity": _F, "expert_sets": _I,
    "expert_width": _I, "shared_experts": _I, "shared_granularity": _F, "pool_group_size": _I,
    "router_scoring": _S, "router_block_size": _I, "router_dtype": _S, "capacity_factor": _F, "overflow": _S, "aux_weight": _F, "aux_scope": _S,
    "pool_weight": _F, "z_weight": _F, "bias_rate": _F, "d_model": _I, "n_layers": _I, "n_heads": _I,
    "d_ff": _I, "vocab_size": _I, "seq_len": _I, "lr": _F, "batch_tokens": _I, "schedule": _S,
    "data_source": _S, "tokenizer": _S,
    "active_params": _I, "total_params": _I, "router_params": _I, "flops_per_token": _I,
    "router_flops_per_token": _I, "train_tokens": _I, "train_flops": _F,
    "steps": _I, "tokens": _I, "train_loss": _F, "val_loss": _F, "perplexity": _F,
    "probe_loss_increase": _F, "probe_acc_drop": _F, "probe_json": _S, "wall_seconds": _F, "tokens_per_second": _F,
    "workers": _I, "gpus": _F, "placement": _S, "est_hours": _F, "hardware": _S,
    "attempts": _I, "started_at": _F, "first_started_at": _F, "simulated": pa.bool_(),
    "error": _S, "config_json": _S, "node": _S, "ray_node_id": _S, "updated_at": _F,
}


def _column_name(param: str) -> str:
    """Swept parameter -> column: `study.sparsity` -> `p_study_sparsity` (SQL-friendly)."""
    return "p_" + param.replace(".", "_").replace("-", "_")


def _param_value(value: Any) -> str | None:
    """Swept values are labels: stored as strings (`0.25`, `dense`, `null` for None) so a column
    has one type whatever values the grid mixes; typed copies are the resolved columns."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def resolved_columns(trial: TrialConfig) -> dict[str, Any]:
    """The resolved trial config as fixed columns every sweep shares (so tables of different
    sweeps line up), read off the typed config: its properties are the one definition of the
    layout, the sparsity and the MoE layers."""
    model, train, moe = trial.model, trial.train, trial.model.moe
    sets, router, balance = moe.experts, moe.router, moe.balance
    return {
        "layout": moe.layout,
        "sparsity": model.sparsity,
        "num_experts": moe.num_routed_experts,
        "top_k": moe.top_k,
        "granularity": sets[0].granularity if sets else 1.0,
        "expert_sets": len(sets),
        "expert_width": int(round(sets[0].granularity * model.d_ff)) if sets else model.d_ff,
        "shared_experts": moe.shared_experts,
        "shared_granularity": moe.shared_granularity if moe.shared_experts else 0.0,
        "pool_group_size": moe.pool_group_size,
        "router_scoring": router.scoring if sets else None,
        "router_block_size": router.block_size if sets else None,
        "router_dtype": router.dtype if sets else None,
        "capacity_factor": moe.capacity_factor,
        # what happens to tokens over capacity: `drop` or `default_expert`; null when dropless
        "overflow": moe.overflow if moe.capacity_factor is not None else None,
        "aux_weight": balance.aux_weight if sets else 0.0,
        "aux_scope": balance.aux_scope if sets else None,
        "pool_weight": balance.pool_weight if sets else 0.0,
        "z_weight": balance.z_weight if sets else 0.0,
        "bias_rate": balance.bias_rate if sets else 0.0,
        "d_model": model.d_model,
        "n_layers": model.n_layers,
        "n_heads": model.n_heads,
        "d_ff": model.d_ff,
        "vocab_size": model.vocab_size,
        "seq_len": model.seq_len,
        "lr": train.lr,
        "batch_tokens": train.batch_tokens,
        "schedule": train.schedule,
        "data_source": trial.data.source,
        "tokenizer": trial.data.tokenizer,
    }


def planned_columns(planned: PlannedTrial, ray_node_id: str | None = None) -> dict[str, Any]:
    """What a trials-table row knows before training: the planned trial, and where it runs."""
    row: dict[str, Any] = {
        "trial_id": planned.trial_id, "sweep": planned.sweep, "scale": planned.scale, "seed": planned.seed,
        "method": planned.method,
    }
    row.update({_column_name(k): _param_value(v) for k, v in planned.params.items()})
    row.update(resolved_columns(planned.config))
    row.update({
        "active_params": planned.active_params, "total_params": planned.total_params,
        "router_params": planned.router_params, "flops_per_token": planned.flops_per_token,
        "router_flops_per_token": planned.router_flops_per_token, "train_tokens": planned.train_tokens,
        "train_flops": planned.train_flops, "workers": planned.shape.workers, "gpus": planned.shape.gpus,
        "placement": planned.shape.placement, "est_hours": planned.est_hours, "hardware": planned.hardware,
    })
    row["config_json"] = json.dumps(planned.config.to_dict(), sort_keys=True)
    row["node"] = socket.gethostname()
    row["ray_node_id"] = ray_node_id
    return row


def point_columns(trial_id: str, sweep: str, method: str, seed: int, point: dict[str, Any]) -> dict[str, Any]:
    """What a row knows of a sampled point that never became a trial (no FLOP-matched config)."""
    return {"trial_id": trial_id, "sweep": sweep, "method": method, "seed": seed,
            **{_column_name(k): _param_value(v) for k, v in point.items()}}


def trial_row(base: dict[str, Any], status: str, summary: dict[str, Any] | None = None,
              error: str | None = None) -> dict[str, Any]:
    """The one builder of trials-table rows (the trial itself, an infeasible point, the driver's
    corrections): `base` (`planned_columns`, `point_columns` or a row already written) with its
    state, and with `summary` (a TrainSummary dict, or as much of one as is known) its results."""
    row = {**base, "status": status, "error": error, "updated_at": time.time()}
    if summary is None:
        return row
    row.update({
        "steps": summary.get("steps"), "tokens": summary.get("tokens"),
        "train_loss": summary.get("train_loss"), "val_loss": summary.get("val_loss"),
        "perplexity": summary.get("perplexity"), "wall_seconds": summary.get("wall_seconds"),
        "tokens_per_second": summary.get("tokens_per_second"),
    })
    for name, value in (summary.get("val_loss_by_set") or {}).items():
        row[f"val_loss/{name}"] = value
    row.update(summary.get("downstream") or {})  # acc_<task>, acc_norm_<task>
    probe = summary.get("routing_probe") or {}
    row["probe_loss_increase"] = probe.get("mean")
    row["probe_acc_drop"] = probe.get("acc_drop/mean")
    row["probe_json"] = json.dumps(probe) if probe else None
    return row


def write_row(path: Path, row: dict[str, Any]) -> None:
    """One trials-table row as a Parquet file, atomically (temporary file, then rename)."""
    write_parquet(path, [row], TRIALS_SCHEMA)


# Columns without which a file is not a row of its table.
REQUIRED = {"trials": ("trial_id", "status"), "steps": ("trial_id", "step")}


class DamagedFile(ValueError):
    """A result file that cannot be read as a row of its table."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: damaged ({reason})")
        self.path, self.reason = Path(path), reason


def file_damage(file: Path, table: str) -> str | None:
    """Why a per-trial file is not one of `table`'s, from its footer alone; None if it looks whole.
    FileNotFoundError if it is gone."""
    damage = parquet_damage(file, REQUIRED[table])
    if damage is None and table == "trials":
        rows = pq.ParquetFile(file).metadata.num_rows
        damage = None if rows == 1 else f"{rows} rows, not one"
    return damage


def read_rows_of(file: Path, table: str = "trials") -> list[dict[str, Any]]:
    """The rows of one per-trial file ([] if it does not exist); `DamagedFile` if it is damaged."""
    try:
        damage = file_damage(file, table)
        if damage is None:
            rows = pq.ParquetFile(file).read().to_pylist()  # no dataset discovery: 2,000 files add up
    except FileNotFoundError:  # vanished mid-read (a restart cleaning up)
        return []
    except (OSError, pa.ArrowException) as err:  # the footer was fine, the data is not
        damage = error_line(err)
    if damage is not None:
        raise DamagedFile(file, damage)
    return rows


def scan_rows(directory: Path, table: str = "trials") -> tuple[list[dict[str, Any]], list[DamagedFile]]:
    """Every readable row of a per-trial table folder, and its damaged files."""
    rows, damaged = [], []
    for file in sorted(directory.glob("*.parquet")):
        try:
            rows += read_rows_of(file, table)
        except DamagedFile as err:
            damaged.append(err)
    return rows, damaged


def read_rows(directory: Path, table: str = "trials") -> list[dict[str, Any]]:
    """Every readable row of a per-trial table folder (damaged files left out: `scan_rows` names them)."""
    return scan_rows(directory, table)[0]


def copy_steps(paths: SweepPaths, trial_id: str) -> bool:
    """The trainer's metrics (`trial_runs/<id>/metrics.parquet`) as the trial's steps-table file;
    False if they are missing or unreadable."""
    metrics = paths.trial_dir(trial_id) / "metrics.parquet"
    try:
        if parquet_damage(metrics, ("step",)) is not None:
            return False
        rows = pq.read_table(metrics).to_pylist()
    except (FileNotFoundError, OSError, pa.ArrowException):
        return False
    write_parquet(paths.steps / f"{trial_id}.parquet", [{"trial_id": trial_id, **r} for r in rows])
    return True


def trial_states(paths: SweepPaths) -> dict[str, dict[str, Any]]:
    """trial_id -> its row, for every trial with a row."""
    return {r["trial_id"]: r for r in read_rows(paths.trials)}


def read_table(runs_dir: str | Path, table: str, sweeps: Iterable[str] | None = None) -> pa.Table:
    """The `trials` or `steps` table of some (default: all) sweeps under `runs_dir` (damaged
    files left out)."""
    runs = Path(runs_dir)
    names = list(sweeps) if sweeps is not None else sorted(p.name for p in runs.iterdir() if (p / "tables").is_dir())
    tables = []
    for name in names:
        for file in sorted((runs / name / "tables" / table).glob("*.parquet")):
            try:
                if file_damage(file, table) is None:
                    tables.append(pq.read_table(file))
            except (FileNotFoundError, OSError, pa.ArrowException):
                continue
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")

"""Damaged result files, repaired by `moe-sweep run` before anything runs.

The project writes every file atomically, but a file can still be damaged from outside: a full
disk or a lost NFS client on shared storage, a node killed mid-copy. A damaged file is never
deleted: it moves to `runs/<sweep>/damaged/`, and then
- a trials row is rebuilt from the trial's own folder (its plan and `summary.json`) when the
  trial finished there, else the trial runs again, from its last good checkpoint;
- a steps file is rebuilt from the trial folder's `metrics.parquet`, else the trial runs again
  from its last checkpoint (which carries every step's row) to write it anew.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.planned import PlannedTrial
from orchestrator.results import (COMPLETED, DIVERGED, FAILED, DamagedFile, SweepPaths, copy_steps, planned_columns,
                                  read_rows_of, scan_rows, trial_row, write_row)

# What a finished trial's folder can stand in for: the trainer's own end states.
_FINISHED = (COMPLETED, DIVERGED)


def set_aside(paths: SweepPaths, file: Path) -> Path:
    """Move a damaged file under `runs/<sweep>/damaged/`, keeping its table's folder and a time stamp."""
    rel = file.relative_to(paths.root)
    aside = paths.root / "damaged" / rel.parent / f"{file.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(file, aside)
    return aside


def repair(paths: SweepPaths, say: Callable[[str], None]) -> int:
    """Repair the sweep's damaged trials and steps files; `say` gets one line per file. Returns
    how many files were damaged."""
    _, trials = scan_rows(paths.trials, "trials")
    for damage in trials:
        tid = damage.path.stem
        aside = set_aside(paths, damage.path)
        row = _row_from_folder(paths, tid)
        if row is not None:
            write_row(damage.path, row)
            done = f"rebuilt from {paths.trial_dir(tid)}"
        else:
            done = "the trial runs again, from its last good checkpoint"
        say(f"{damage}; kept as {aside}, {done}")
    _, steps = scan_rows(paths.steps, "steps")
    for damage in steps:
        tid = damage.path.stem
        aside = set_aside(paths, damage.path)
        if copy_steps(paths, tid):
            say(f"{damage}; kept as {aside}, rebuilt from {paths.trial_dir(tid) / 'metrics.parquet'}")
            continue
        _rerun(paths, tid)
        say(f"{damage}; kept as {aside}, and the trial folder's metrics are unreadable: "
            "the trial runs again from its last checkpoint to write them")
    return len(trials) + len(steps)


def _row_from_folder(paths: SweepPaths, tid: str) -> dict[str, Any] | None:
    """The trial's row as the trial itself would have written it at its end, from its plan
    (`plan/<id>.json`) and its folder's `summary.json`; None unless both are readable and the
    trial finished there."""
    try:
        planned = PlannedTrial.read(paths.plan / f"{tid}.json")
        summary = json.loads((paths.trial_dir(tid) / "summary.json").read_text())
    except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
        return None
    if not isinstance(summary, dict) or summary.get("status") not in _FINISHED:
        return None
    if isinstance(summary.get("val_loss"), dict):  # written before val_loss became the float everywhere
        summary = {**summary, "val_loss": summary.get("val_loss_macro"), "val_loss_by_set": summary["val_loss"]}
    base = planned_columns(planned)
    return trial_row(base | {"simulated": False}, summary["status"], summary)


def _rerun(paths: SweepPaths, tid: str) -> None:
    """Mark a finished trial to run again (a `failed` row is retried by the next run)."""
    file = paths.trials / f"{tid}.parquet"
    try:
        rows = read_rows_of(file)
    except DamagedFile:
        return
    if rows:
        write_row(file, trial_row(rows[0], FAILED, error="its steps table was damaged: run again from its last checkpoint"))

"""`moe-sweep status NAME`: trials per state, the best so far, elapsed and estimated remaining
time, read from the sweep's result tables (works while the sweep runs and after it ended)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from moe_core.errors import ConfigError
from orchestrator.results import COMPLETED, RUNNING, STATES, TERMINAL, SweepPaths, read_rows


def _driver(paths: SweepPaths) -> dict:
    try:
        return json.loads(paths.driver.read_text())
    except (OSError, ValueError):
        return {}


def print_status(name: str, runs_dir: str | Path, console: Console) -> None:
    paths = SweepPaths(runs_dir, name)
    if not paths.trials.is_dir():
        known = sorted(p.name for p in Path(runs_dir).glob("*") if (p / "tables").is_dir()) if Path(runs_dir).is_dir() else []
        raise ConfigError(f"no sweep '{name}' under {runs_dir}" + (f"; sweeps there: {', '.join(known)}" if known else ""))
    rows = read_rows(paths.trials)
    driver = _driver(paths)
    alive = bool(driver) and psutil.pid_exists(driver.get("pid", -1))
    counts = {s: 0 for s in STATES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if not alive and counts[RUNNING]:  # rows left 'running' by a driver that is gone
        counts["interrupted"], counts[RUNNING] = counts[RUNNING], 0
    planned = int(driver.get("planned", len(rows)))
    done = sum(counts[s] for s in TERMINAL)
    waiting = max(0, planned - sum(counts.values()))
    table = Table(title=f"{name}: {'running' if alive else 'not running'} ({paths.root})", title_justify="left")
    for col in ("state", "trials"):
        table.add_column(col)
    for state, n in counts.items():
        if n:
            table.add_row(state, str(n))
    table.add_row("not started", str(waiting))
    console.print(table)
    completed = [r for r in rows if r["status"] == COMPLETED and isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
    if completed:
        best = min(completed, key=lambda r: r["val_loss"])
        console.print(f"best val_loss {best['val_loss']:.4f}: trial {best['trial_id']} "
                      + ", ".join(f"{k[2:]}={v}" for k, v in best.items() if k.startswith("p_")))
    if driver.get("started"):
        elapsed = time.time() - driver["started"]
        left = planned - done
        line = f"elapsed {elapsed / 60:.1f} min since the latest run started"
        finished_now = done - int(driver.get("finished_before", 0))
        if alive and finished_now > 0 and left > 0:  # at this run's pace so far
            line += f"; about {left * elapsed / finished_now / 60:.1f} min left for {left} trials"
        console.print(line)

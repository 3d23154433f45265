"""`moe-sweep status NAME`: trials per state, the best so far, elapsed and estimated remaining
time, read from the sweep's result tables (works while the sweep runs and after it ended)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from moe_core.errors import ConfigError
from orchestrator.ray_session import recorded_process
from orchestrator.results import COMPLETED, RUNNING, STATES, TERMINAL, SweepPaths, scan_rows


def _driver(paths: SweepPaths) -> dict:
    try:
        return json.loads(paths.driver.read_text())
    except (OSError, ValueError):
        return {}


def sweep_names(args: list[str]) -> list[str]:
    """Sweep names from the command line: a name as it is, a YAML or a folder of them as the
    names they give (`moe-sweep status sweeps/slicing_dicing/`)."""
    from orchestrator.planner import SweepFile, sweep_files

    names: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir() or path.suffix in (".yaml", ".yml"):
            names += [SweepFile(f).spec.name for f in sweep_files(path)]
        else:
            names.append(arg)
    return list(dict.fromkeys(names))


def print_statuses(args: list[str], runs_dir: str | Path, console: Console) -> None:
    """Each sweep's status, then (for several) the whole queue's trials per state."""
    names = sweep_names(args)
    whole: dict[str, int] = {}
    for name in names:
        for state, n in print_status(name, runs_dir, console).items():
            whole[state] = whole.get(state, 0) + n
    if len(names) > 1:
        parts = ", ".join(f"{state} {n}" for state, n in whole.items() if n)
        console.print(f"[bold]all {len(names)} sweeps[/bold]: {sum(whole.values()):,} planned trials: {parts}")


def print_status(name: str, runs_dir: str | Path, console: Console) -> dict[str, int]:
    paths = SweepPaths(runs_dir, name)
    if not paths.trials.is_dir():
        known = sorted(p.name for p in Path(runs_dir).glob("*") if (p / "tables").is_dir()) if Path(runs_dir).is_dir() else []
        raise ConfigError(f"no sweep '{name}' under {runs_dir}" + (f"; sweeps there: {', '.join(known)}" if known else ""))
    rows, damaged = scan_rows(paths.trials)
    driver = _driver(paths)
    alive = recorded_process(driver.get("pid", -1), driver.get("create_time")) is not None
    counts = {s: 0 for s in STATES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if not alive and counts[RUNNING]:  # rows left 'running' by a driver that is gone
        counts["interrupted"], counts[RUNNING] = counts[RUNNING], 0
    counts["damaged"] = len(damaged)  # files that are no row (`moe-sweep run` repairs them)
    planned = int(driver.get("planned", len(rows)))
    done = sum(counts[s] for s in TERMINAL)
    waiting = max(0, planned - sum(counts.values()))
    # A heading line, not the table's title: a title wraps at the (narrow) table's width, mid-path.
    console.print(f"[bold]{name}[/bold]: {'running' if alive else 'not running'} ({paths.root})", soft_wrap=True)
    table = Table()
    for col in ("state", "trials"):
        table.add_column(col)
    for state, n in counts.items():
        if n:
            table.add_row(state, str(n))
    table.add_row("not started", str(waiting))
    console.print(table)
    for damage in damaged:
        console.print(f"{damage}; counted as damaged (`moe-sweep run` on its YAML repairs it)", soft_wrap=True, markup=False)
    completed = [r for r in rows if r["status"] == COMPLETED and isinstance(r.get("val_loss"), float) and math.isfinite(r["val_loss"])]
    if completed:
        best = min(completed, key=lambda r: r["val_loss"])
        console.print(f"best val_loss {best['val_loss']:.4f}: trial {best['trial_id']} "
                      + ", ".join(f"{k[2:]}={v}" for k, v in best.items() if k.startswith("p_")))
    console.print(_time_line(driver, alive, planned, done))
    return {**counts, "not started": waiting}


def _time_line(driver: dict, alive: bool, planned: int, done: int) -> str:
    """Elapsed and time left: at this run's pace once a trial of it has finished, else what the
    plan estimated (from its hardware's assumed MFU)."""
    left = planned - done
    if not driver.get("started"):
        return f"{left} trials left"
    elapsed = time.time() - driver["started"]
    line = f"elapsed {elapsed / 60:.1f} min since the latest run started"
    if left <= 0:
        return line + "; every trial has finished"
    if not alive:
        return line + f"; {left} trials left (`moe-sweep run` on the sweep's YAML resumes them)"
    finished_now = done - int(driver.get("finished_before", 0))
    if finished_now > 0:
        return line + f"; time left about {left * elapsed / finished_now / 60:.1f} min for {left} trials (at this run's pace)"
    estimate = driver.get("est_hours")
    guess = f": the plan estimated {estimate * 60:.1f} min of compute" if isinstance(estimate, (int, float)) else ""
    return line + f"; time left unknown until a trial of this run finishes{guess}"

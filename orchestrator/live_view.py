"""The driver's view of a running sweep: a live rich table on a terminal (trials per state, the
best so far, the trials running now), one line per finished trial otherwise. It replaces Ray
Tune's own console output, which the runner turns off."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


class LiveView:
    def __init__(self, console: Console, sweep: str, total: int, metric: str, goal: str, dashboard: str | None) -> None:
        self.console, self.sweep, self.total, self.metric, self.goal = console, sweep, total, metric, goal
        self.dashboard = dashboard
        self.start = time.time()
        self.states: dict[str, str] = {}  # trial id -> state
        self.done = 0  # trials that finished (any state but running)
        self.latest: dict[str, dict[str, Any]] = {}  # trial id -> last reported metrics
        self.best: tuple[float, str] | None = None
        self.live: Live | None = None
        self.labels: dict[str, str] = {}  # trial id -> its swept values, e.g. "arch=moe_g1, seed=0"

    def label(self, trial_id: str, params: dict[str, Any], seed: int | None = None) -> None:
        """Show `trial_id` by what it varies (hash ids alone say nothing to a reader)."""
        self.labels[trial_id] = trial_label(params, seed)

    def _name(self, trial_id: str) -> str:
        return f"{self.labels[trial_id]} ({trial_id})" if trial_id in self.labels else trial_id

    def __enter__(self) -> "LiveView":
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self.live.update(self.render())
            self.live.stop()

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value < self.best[0] if self.goal == "minimize" else value > self.best[0]

    def result(self, trial_id: str, metrics: dict[str, Any]) -> None:
        self.states[trial_id] = "running"
        self.latest[trial_id] = metrics
        self._refresh()

    def finished(self, trial_id: str, state: str, row: dict[str, Any] | None) -> None:
        if self.states.get(trial_id, "running") == "running":
            self.done += 1
        self.states[trial_id] = state
        value = (row or {}).get(self.metric, (row or {}).get("val_loss"))
        if state == "completed" and isinstance(value, (int, float)) and self._better(value):
            self.best = (float(value), trial_id)
        if not self.live:
            metric = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else ""
            self.console.print(f"[{self.done}/{self.total}] {self._name(trial_id)} {state} {metric}".rstrip(),
                               markup=False, highlight=False)
        self._refresh()

    def _refresh(self) -> None:
        if self.live:
            self.live.update(self.render())

    def render(self) -> Group:
        counts: dict[str, int] = {}
        for s in self.states.values():
            counts[s] = counts.get(s, 0) + 1
        waiting = max(0, self.total - len(self.states))
        elapsed = time.time() - self.start
        head = Text(f"{self.sweep}: {self.total} trials, {elapsed / 60:.1f} min elapsed"
                    + (f"; Ray dashboard {self.dashboard}" if self.dashboard else ""))
        summary = Table.grid(padding=(0, 2))
        summary.add_row(*(f"{k}: {v}" for k, v in sorted(counts.items())), f"waiting: {waiting}")
        if self.best:
            summary.add_row(f"best {self.metric}: {self.best[0]:.4f}: {self._name(self.best[1])}")
        running = Table(title="running", title_justify="left", show_edge=False)
        for col in ("trial", "step", "train_loss", self.metric):
            running.add_column(col)
        for tid, state in self.states.items():
            if state == "running":
                m = self.latest.get(tid, {})
                running.add_row(self._name(tid), str(m.get("step", "-")), _fmt(m.get("train_loss")), _fmt(m.get(self.metric)))
        return Group(head, summary, running)


def trial_label(params: dict[str, Any], seed: int | None = None) -> str:
    """`study.granularity: 0.25, arch: moe_g1` (+ seed 0) -> "granularity=0.25, arch=moe_g1, seed=0"."""
    parts = [f"{k.rsplit('.', 1)[-1]}={format(v, 'g') if isinstance(v, float) else v}" for k, v in params.items()]
    return ", ".join(parts + ([f"seed={seed}"] if seed is not None else []))


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

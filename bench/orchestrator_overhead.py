"""The orchestrator's own cost against bare Ray Tune on N no-op trials (goal: within 1.5x).

N no-op trials through the same code path as a real sweep (planner, Ray Tune with reused actors,
per-trial Parquet rows, MLflow mirror), and the same N no-op trials through a bare `tune.Tuner`
(a function trainable that reports once, one CPU per trial, reused actors, the same Ray size,
dashboard off, verbosity 0, Tune's default loggers). Both are timed from Ray's start to its stop;
the ratio is the goal (ours within 1.5x of bare Tune). Then a check that every trial of ours
landed exactly once.

    python bench/orchestrator_overhead.py [--trials 2000] [--cpus 2] [--order bare-first|ours-first]
                                          [--only bare|ours] [--cpu-usage]

Each side runs in its own fresh Python process (one after the other, never overlapping: the
first one's Ray is shut down and its process gone before the second starts), so neither pays or
saves the other's imports, and Ray's and Tune's process-wide state cannot leak from one to the
other. Imports are outside the timings; Ray start and stop are inside both. `fit` is the time
inside `Tuner.fit` alone. `--cpu-usage` adds the CPU time each kind of process used (driver,
workers, raylet, GCS, Ray's other processes) per trial; on a 2-core machine the total is what
bounds throughput (it also counts worker processes: bare Tune sometimes evicts and restarts its
reused actors, 16-31 processes a run instead of 4, which makes it ~25% slower). Single runs on a
shared machine are noisy: compare several, in both orders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/orchestrator_overhead.py` from anywhere
    sys.path.insert(0, str(ROOT))

SWEEP = """\
name: overhead
resources: {{cpus: 1}}
seeds: {trials}
base:
  scale: micro-xs
  study: {{sparsity: 4, granularity: 1/4}}
  train: {{steps: 1, batch_tokens: 2048, micro_batch_size: 8}}
  data: {{source: bible, tokenizer: bytes}}
"""

GOAL = 1.5


class _FitTimer:
    """Wraps `ray.tune.Tuner.fit` (class-level, so it also sees the runner's own Tuner) and
    records how long the calls took (and, with a sampler, the CPU used meanwhile)."""

    def __init__(self, sampler: _CpuSampler | None = None) -> None:
        from ray import tune

        self.seconds = 0.0
        self.sampler = sampler
        original = tune.Tuner.fit

        def fit(tuner, *args, **kwargs):
            if self.sampler:
                self.sampler.mark("fit_start")
            t0 = time.perf_counter()
            try:
                return original(tuner, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                if self.sampler:
                    self.sampler.mark("fit_end")

        tune.Tuner.fit = fit


class _CpuSampler:
    """With --cpu-usage: CPU seconds of this process and every process below it (Ray's raylet, GCS,
    workers, agents), sampled twice a second until `stop` (call it before Ray shuts down)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.seen, self.base, self.marks = enabled, {}, {}, {}
        if not enabled:
            return
        import threading

        import psutil

        self.me = psutil.Process()
        self._sample()
        self.base = dict(self.seen)  # what the processes had used before (imports)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _kind(self, proc) -> str:
        if proc.pid == self.me.pid:
            return "driver"
        args = proc.cmdline()
        cmd = " ".join(args)
        for key in ("raylet", "gcs_server"):
            if args and key in args[0]:
                return key
        if "default_worker.py" in cmd or (cmd.startswith("ray::") and "Agent" not in cmd):
            return "workers"  # a worker's command line becomes its task, e.g. `ray::ImplicitFunc.train`
        return "other Ray"  # agents, dashboard, log monitor, ...

    def _sample(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                key = (proc.pid, proc.create_time())
                t = proc.cpu_times()
                kind = self.seen[key][0] if key in self.seen else self._kind(proc)
                self.seen[key] = (kind, t.user + t.system)
            except psutil.Error:
                continue

    def mark(self, label: str) -> None:
        if self.enabled:
            self._sample()
            self.marks[label] = dict(self.seen)

    def _loop(self) -> None:
        while not self.done.wait(0.5):
            self._sample()

    def stop(self) -> dict[str, dict[str, float]] | None:
        """CPU seconds by kind of process: from Ray's start to now, and during `fit`."""
        if not self.enabled:
            return None
        if not self.done.is_set():
            self.done.set()
            self.thread.join()
            self._sample()
        processes: dict[str, int] = {}
        for kind, _ in self.seen.values():
            processes[kind] = processes.get(kind, 0) + 1
        return {"all": self._diff(self.base, self.seen),
                "fit": self._diff(self.marks.get("fit_start", {}), self.marks.get("fit_end", {})),
                "processes": processes}

    @staticmethod
    def _diff(before: dict, after: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, (kind, cpu) in after.items():
            out[kind] = out.get(kind, 0.0) + cpu - before.get(key, (kind, 0.0))[1]
        return out


def _noop(config: dict) -> None:
    from ray import tune

    tune.report({"noop": 1})


def phase_bare(trials: int, cpus: float, tmp: Path, cpu_usage: bool = False) -> dict:
    """Bare Ray Tune: N no-op trials, one CPU each, reused actors, a grid over `seed`."""
    import ray
    from ray import tune

    # As the runner does (it replaces Tune's console output): without it, verbose=0 still prints
    # a header, and the two sides would run different reporters.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(_noop, {"cpu": 1})
    sampler = _CpuSampler(cpu_usage)
    timer = _FitTimer(sampler)
    t0 = time.perf_counter()
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    t_start = time.perf_counter() - t0
    try:
        grid = tune.Tuner(
            trainable, param_space={"seed": tune.grid_search(list(range(trials)))},
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name="bare", storage_path=str(tmp / "bare"), verbose=0),
        ).fit()
    finally:
        cpu = sampler.stop()
        t1 = time.perf_counter()
        ray.shutdown()
        t_stop = time.perf_counter() - t1
    total = time.perf_counter() - t0
    done = sum(1 for r in grid if r.error is None and (r.metrics or {}).get("noop") == 1)
    return {"total": total, "fit": timer.seconds, "ray_start": t_start, "ray_stop": t_stop,
            "trials": trials, "completed": done, "ok": done == trials, "cpu": cpu}


def phase_ours(trials: int, cpus: float, tmp: Path, cpu_usage: bool = False) -> dict:
    """Ours: the sweep runner on N no-op trials (plan, Ray start, Tune, Parquet, MLflow, Ray stop)."""
    from rich.console import Console

    import orchestrator.sweep_runner as runner
    from orchestrator.planner import plan_sweep
    from orchestrator.results import SweepPaths, read_rows
    from orchestrator.sweep_runner import RunOptions, run_sweep

    spans: dict[str, float] = {}
    cpu: dict[str, dict] = {}  # filled just before Ray stops

    def timed(name: str):  # the runner's Ray start/stop, if it still calls them by these names
        original = getattr(runner, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            if name == "stop_ray":
                cpu.update(sampler.stop() or {})
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans[name] = spans.get(name, 0.0) + time.perf_counter() - t0

        setattr(runner, name, wrapper)

    timed("start_ray")
    timed("stop_ray")
    path = tmp / "overhead.yaml"
    path.write_text(SWEEP.format(trials=trials))
    t0 = time.perf_counter()
    plan = plan_sweep(path)
    t_plan = time.perf_counter() - t0  # informational: run_sweep plans again, inside its own time
    sampler = _CpuSampler(cpu_usage)
    timer = _FitTimer(sampler)
    t0 = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        counts = run_sweep(path, RunOptions(runs_dir=str(tmp / "runs"), num_cpus=cpus, dashboard=False, noop=True),
                           Console(file=devnull))
    total = time.perf_counter() - t0
    if not cpu:  # the runner no longer calls `stop_ray` by that name: Ray's processes are gone by now
        cpu.update(sampler.stop() or {})
    rows = read_rows(SweepPaths(tmp / "runs", "overhead").trials)
    ids = [r["trial_id"] for r in rows]
    planned = len(plan.trials)
    once = len(ids) == len(set(ids)) == planned and counts == {"completed": planned}
    return {"total": total, "fit": timer.seconds, "ray_start": spans.get("start_ray"),
            "ray_stop": spans.get("stop_ray"), "plan": t_plan, "trials": planned, "rows": len(ids),
            "distinct": len(set(ids)), "counts": counts, "ok": once, "cpu": cpu or None}


def _child(phase: str, args: argparse.Namespace, tmp: Path) -> dict:
    """Run one phase in a fresh interpreter; returns its timings."""
    out = tmp / f"{phase}.json"
    work = tmp / phase
    work.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--trials", str(args.trials),
           "--cpus", str(args.cpus), "--tmp", str(work), "--result", str(out)]
    if args.cpu_usage:
        cmd.append("--cpu-usage")
    proc = subprocess.run(cmd, check=False, cwd=str(ROOT))
    if proc.returncode != 0 or not out.exists():
        sys.exit(f"{phase} phase failed (exit status {proc.returncode})")
    return json.loads(out.read_text())


def _ms(seconds: float | None, n: int) -> str:
    return f"{seconds / n * 1000:.1f} ms/trial" if seconds is not None and n else "-"


def _s(seconds: float | None) -> str:
    return f"{seconds:.1f} s" if seconds is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--cpus", type=float, default=os.cpu_count())
    parser.add_argument("--order", choices=("bare-first", "ours-first"), default="bare-first",
                        help="which side runs first (the machine warms up; alternate to see the effect)")
    parser.add_argument("--only", choices=("bare", "ours"), help="run one side only (no ratio)")
    parser.add_argument("--cpu-usage", action="store_true",
                        help="also sample the CPU time of the driver and of Ray's processes (per trial, by process)")
    parser.add_argument("--phase", choices=("bare", "ours"), help=argparse.SUPPRESS)  # internal: one child
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # a child: run one side, write its timings
        run = phase_bare if args.phase == "bare" else phase_ours
        result = run(args.trials, args.cpus, Path(args.tmp), args.cpu_usage)
        Path(args.result).write_text(json.dumps(result))
        return

    phases = ["bare", "ours"] if args.order == "bare-first" else ["ours", "bare"]
    if args.only:
        phases = [args.only]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            results[phase] = _child(phase, args, Path(tmp))

    n = args.trials
    print(f"{n} no-op trials, {args.cpus:g} CPUs, 1 CPU per trial, reused actors; order: {' then '.join(phases)}")
    bare, ours = results.get("bare"), results.get("ours")
    if bare:
        print(f"bare Tune: {_s(bare['total'])} (Ray start {_s(bare['ray_start'])}, fit {_s(bare['fit'])}, "
              f"Ray stop {_s(bare['ray_stop'])}); {_ms(bare['total'], n)}, fit {_ms(bare['fit'], n)}"
              f"; {bare['completed']}/{n} trials completed")
    if ours:
        other = ours["total"] - ours["fit"] - (ours["ray_start"] or 0.0) - (ours["ray_stop"] or 0.0)
        print(f"ours:      {_s(ours['total'])} (Ray start {_s(ours['ray_start'])}, fit {_s(ours['fit'])}, "
              f"Ray stop {_s(ours['ray_stop'])}, plan/MLflow/tables outside fit {_s(other)}); "
              f"{_ms(ours['total'], n)}, fit {_ms(ours['fit'], n)}")
        print(f"           (planning alone, run again by the bench for the check: {_s(ours['plan'])})")
    if bare and ours:
        ratio, fit_ratio = ours["total"] / bare["total"], ours["fit"] / bare["fit"]
        extra = (ours["total"] - bare["total"]) / n * 1000
        print(f"ratio: {ratio:.2f}x (goal <= {GOAL}x) {'met' if ratio <= GOAL else 'NOT met'}; "
              f"fit only {fit_ratio:.2f}x; ours costs {extra:+.1f} ms per trial more")
    for name, r in (("bare Tune", bare), ("ours", ours)):
        for span, what in (("all", "Ray start to stop"), ("fit", "fit only")):
            cpu = (r or {}).get("cpu") and r["cpu"][span]
            if cpu:
                procs = r["cpu"].get("processes", {})
                parts = ", ".join(
                    f"{k} {v / n * 1000:.1f}" + (f" ({procs[k]} processes)" if procs.get(k, 1) > 1 else "")
                    for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
                print(f"CPU ms per trial, {name}, {what}: {sum(cpu.values()) / n * 1000:.1f} ({parts})")
    if ours:
        print(f"every trial landed exactly once: {ours['ok']} ({ours['rows']} rows, {ours['distinct']} distinct ids, "
              f"states {ours['counts']})")
    if (ours and not ours["ok"]) or (bare and not bare["ok"]):
        sys.exit(1)


if __name__ == "__main__":
    main()

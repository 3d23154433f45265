"""The whole study on a simulated GPU cluster: how well one queue uses it, with and without faults.

Starts a Ray cluster of fake-GPU nodes on this machine (`ray.cluster_utils.Cluster`, default 8
nodes x 8 GPUs) and runs the real orchestrator over a folder of sweeps (default the study's
`sweeps/slicing_dicing/`, 2,358 trials) with `moe-sweep run --simulate SCALE`: planning, per-trial
shapes, gang placement, the longest-first queue, retries, resume, Parquet and MLflow, each trial
holding its resources for its planned wall time x SCALE instead of training. Prints, in planned
hours, the makespan, the lower bound max(GPU-hours / GPUs, longest trial), their ratio and the
mean GPU utilisation, for:

- today's behaviour: the sweeps one after another, every trial on the YAML's shape (4 GPUs,
  Ray's soft packing), first come first served with backfill: list-scheduled on the plan's own estimates (it
  cannot run as one command: one sweep per command, and its rows would be another study's);
- the new behaviour as the same model predicts it (per-trial shapes, gangs, a look-ahead of 8,
  the queue order `moe-sweep run` picks on this cluster) at real speed, as on a real cluster (a
  trial lasts minutes to days, each node starts its own trial actors), and at SCALE (the
  driver's time per start and a new trial actor's, all on this machine, counted at SCALE);
- the new behaviour measured on the cluster (the real orchestrator, simulated trials).

With `--faults` the measured run loses 2 worker nodes part-way (added back later) and its driver
is SIGKILLed once, then the same command runs again; it prints `exactly once: R rows for N
trials` and the ratio with faults. Last, the bench's wall time and where it went (planning, the
cluster's start, the run, the driver's exit, reading the rows): the goal is the whole study
within 30 minutes on 2 cores (the default SCALE, 0.0017: 1 planned hour = 6.12 s).

    python bench/cluster_schedule.py [--nodes 8] [--gpus-per-node 8] [--scale 0.0017 | --minutes M]
                                     [--faults] [--sweeps sweeps/slicing_dicing]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.cluster_model import Job, Schedule, best_queue, simulate, start_gaps  # noqa: E402
from orchestrator.planner import Plan, SweepFile, plan_sweep, sweep_files  # noqa: E402

TODAY_WORKERS = 4  # every slicing_dicing YAML's `resources.workers` before per-trial shapes
# Simulated seconds per planned second: the whole study (~278 planned hours) in ~29 minutes on
# 2 cores. The trial actors' starts (~3 s each, all on this machine) then cost the queue ~7%: the
# model gives 1.066x the bound here, 1.000x at real speed, where each node starts its own.
SCALE = 0.0017


def plans(folder: str, fixed_workers: int | None = None) -> list[Plan]:
    out = []
    for file in sweep_files(folder):
        sweep = SweepFile(file)
        if fixed_workers is not None:
            r = sweep.spec.resources.model_copy(update={"workers": fixed_workers})
            sweep.spec = sweep.spec.model_copy(update={"resources": r})
        out.append(plan_sweep(sweep))
    return out


def today(folder: str, nodes: int, per_node: int) -> Schedule:
    jobs = [Job(t.est_hours, int(t.shape.gpus), gang=False, group=i)
            for i, p in enumerate(plans(folder, TODAY_WORKERS)) for t in p.trials]
    return simulate(jobs, nodes, per_node, window=None)  # Tune's default: hundreds of requests pending


def new_model(ps: list[Plan], nodes: int, per_node: int, scale: float | None = None) -> tuple[str, Schedule]:
    """The orchestrator's queue on this cluster as the model predicts it, the driver's time per
    start and a new actor's counted at `scale` (the order is the one `moe-sweep run` would choose)."""
    jobs = [Job(t.est_hours, int(t.shape.gpus)) for p in ps for t in p.trials]
    order, _, s = best_queue(jobs, nodes, per_node, *start_gaps(scale))
    return order, s


def line(label: str, s: Schedule) -> str:
    return (f"{label:<34} makespan {s.makespan:7.1f} h, bound {s.bound:7.1f} h, makespan/bound {s.ratio:.3f}, "
            f"GPU utilisation {s.utilisation:.1%}, {s.gpu_hours:,.0f} GPU-h")


class SimCluster:
    """A Ray cluster of fake-GPU nodes: a small head (the drivers connect there) and workers."""

    def __init__(self, nodes: int, per_node: int, cpus_per_gpu: float) -> None:
        # Fake CPUs are many; Ray must not start a Python worker per CPU (hundreds of processes).
        os.environ.update({"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0",
                           "RAY_num_workers_soft_limit": str(per_node + 2)})
        from ray.cluster_utils import Cluster

        self.per_node, self.cpus = per_node, int(per_node * cpus_per_gpu)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 << 20})
        self.workers = [self.add() for _ in range(nodes)]
        self.cluster.wait_for_nodes()

    def add(self):
        return self.cluster.add_node(num_cpus=self.cpus, num_gpus=self.per_node, object_store_memory=80 << 20)

    def remove(self, k: int) -> None:
        for node in self.workers[-k:]:
            self.cluster.remove_node(node, allow_graceful=False)
        self.workers = self.workers[:-k]

    def process_starts(self) -> list[float]:
        """When each Ray worker process of the run started (one log per core worker, its first
        line stamped; drivers log apart): each trial actor costs ~1.9 CPU-s (a process, `import
        ray.tune`, the trainable's set-up) before its first trial, so on 2 cores their count and
        timing, not the queue, bound a phase of many short trials."""
        logs = Path(self.cluster.head_node.get_session_dir_path()) / "logs"
        return [t for t in (_first_stamp(f) for f in logs.glob("python-core-worker-*.log")) if t is not None]

    def shutdown(self) -> None:
        self.cluster.shutdown()


def run_driver(folder: str, address: str, runs: Path, scale: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", folder, "--address", address, "--simulate", repr(scale),
           "--runs-dir", str(runs), "--mlflow-uri", f"sqlite:///{runs / 'mlflow.db'}", "--no-dashboard"]
    log = open(runs / f"driver-{time.time():.0f}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _first_stamp(log: Path) -> float | None:
    """The time on a Ray log's first line (`[2026-12-07 16:03:12,123 I ...`), local time."""
    from datetime import datetime

    try:
        head = log.open().readline()
        return datetime.strptime(head[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except (OSError, ValueError):
        return None


def timeline(rows: list[dict], gpus: int, starts: list[float], bins: int = 10) -> str:
    """GPU utilisation and new worker processes in each tenth of the run, from the rows'
    start and end times: where a run loses time (a change of trial shape shows as a dip
    with many processes started)."""
    spans = [(r["started_at"], r["updated_at"], r.get("gpus") or 0) for r in rows if r.get("started_at")]
    t0, t1 = min(a for a, _, _ in spans), max(b for _, b, _ in spans)
    width = (t1 - t0) / bins
    cells = []
    for k in range(bins):
        a0, a1 = t0 + k * width, t0 + (k + 1) * width
        busy = sum(g * max(0.0, min(b, a1) - max(a, a0)) for a, b, g in spans)
        born = sum(1 for t in starts if a0 <= t < a1 or (k == bins - 1 and t >= a1))
        cells.append(f"{busy / (gpus * width):.2f}/{born}")
    return "by tenth of the run (GPU utilisation/new processes): " + " ".join(cells)


def all_rows(ps: list[Plan], runs: Path) -> list[dict]:
    """Every sweep's trial rows (read once: ~7 s for the study's 2,358 on 2 cores)."""
    from orchestrator.results import SweepPaths, read_rows

    return [r for p in ps for r in read_rows(SweepPaths(runs, p.spec.name).trials)]


def measured(ps: list[Plan], rows: list[dict], scale: float, gpus: int) -> tuple[Schedule, int, int, int]:
    """The run's schedule from its rows (first start to last end, in planned hours), rows,
    trials finished once and retried ones."""
    planned = {(p.spec.name, t.trial_id): t for p in ps for t in p.trials}
    # From the first trial's start: the driver's own set-up (planning, Tune creating 2,358
    # trials: minutes on 2 cores) is printed apart; at SCALE it would stand for days of cluster time.
    first = first_trial_start(rows)
    last = max(r["updated_at"] for r in rows)
    makespan = (last - first) / scale / 3600
    work = sum(t.est_hours * t.shape.gpus for t in planned.values())
    longest = max(t.est_hours for t in planned.values())
    done = sum(1 for r in rows if r["status"] == "completed" and (r["sweep"], r["trial_id"]) in planned)
    retried = sum(1 for r in rows if (r.get("attempts") or 1) > 1)
    return Schedule(makespan, work, gpus, longest), len(rows), done, retried


def first_trial_start(rows: list[dict]) -> float:
    return min(r.get("first_started_at") or r["started_at"] for r in rows if r.get("started_at"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweeps", default="sweeps/slicing_dicing")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-gpu", type=float, default=8.0, help="fake CPUs per GPU on each node (the sweeps ask 8 per worker)")
    parser.add_argument("--scale", type=float, default=SCALE, help="simulated seconds per planned second")
    parser.add_argument("--minutes", type=float, help="instead, choose SCALE so the planned makespan takes this long "
                        "(shorter: the trial actors' starts, on this machine's cores, weigh more)")
    parser.add_argument("--faults", action="store_true", help="lose 2 nodes part-way (back later) and SIGKILL the driver once")
    parser.add_argument("--keep", help="keep the run's folder here (default: a temporary one)")
    args = parser.parse_args()
    began = time.time()
    nodes, per_node = args.nodes, args.gpus_per_node
    gpus = nodes * per_node
    folder = str(Path(args.sweeps).resolve())

    ps = plans(folder)
    old = today(folder, nodes, per_node)
    trials = sum(len(p.trials) for p in ps)
    # The model at real speed (each node starts its own actors), then at SCALE (the queue's order
    # and the driver's share both depend on it); --minutes derives SCALE from the first.
    real_order, real = new_model(ps, nodes, per_node)
    scale = args.scale if args.minutes is None else args.minutes * 60 / (real.makespan * 3600)
    order, model = new_model(ps, nodes, per_node, scale)
    print(f"{trials:,} trials of {len(ps)} sweeps ({args.sweeps}) on {nodes} nodes x {per_node} fake GPUs; "
          f"SCALE {scale:.3g} (1 planned hour = {3600 * scale:.2f} s)", flush=True)
    print(line("today (model: one sweep at a time)", old))
    print(line(f"new (model at real speed, {real_order})", real))
    print(line(f"new (model: one queue, {order})", model), flush=True)

    runs = Path(args.keep or tempfile.mkdtemp(prefix="cluster-schedule-"))
    runs.mkdir(parents=True, exist_ok=True)
    planned = time.time()
    cluster = SimCluster(nodes, per_node, args.cpus_per_gpu)
    try:
        first = time.time()
        driver = run_driver(folder, cluster.cluster.address, runs, scale)
        lost = 0.0  # GPU-seconds the removed nodes were gone
        if args.faults:
            expected = model.makespan * 3600 * scale
            lost = _faults(driver, cluster, folder, runs, scale, expected) * per_node
        else:
            driver.wait()
        starts = cluster.process_starts()
    finally:
        ended = time.time()
        cluster.shutdown()
    stopped = time.time()
    trial_rows = all_rows(ps, runs)
    schedule, rows, done, retried = measured(ps, trial_rows, scale, gpus)
    print(f"driver set-up before the first trial started: {first_trial_start(trial_rows) - first:.0f} s")
    label = "new (measured, with faults)" if args.faults else "new (measured on the cluster)"
    print(line(label, schedule))
    print(timeline(trial_rows, gpus, starts))
    print(f"Ray worker processes started: {len(starts)} for {trials} trials (each a trial actor, reused while a trial of its shape "
          f"waits; the model: {model.actors})")
    print(f"exactly once: {rows} rows for {trials} trials ({done} completed once each, {retried} started more than once)")
    if args.faults:  # the same work on the GPUs the cluster had: no schedule ends sooner than this
        lost_h = lost / scale / 3600
        present = max(schedule.longest, (schedule.gpu_hours + lost_h) / gpus)
        print(f"bound on the GPUs present ({lost_h:,.0f} GPU-h gone with the 2 nodes): {present:.1f} h, "
              f"makespan/bound on the GPUs present {schedule.makespan / present:.3f}")
    print(f"makespan/bound: today {old.ratio:.3f}, new {schedule.ratio:.3f}{' with faults' if args.faults else ''} "
          f"(model {model.ratio:.3f}); planned GPU-hours today {old.gpu_hours:,.0f}, new {model.gpu_hours:,.0f}")
    last = max(r["updated_at"] for r in trial_rows)  # the last row written
    print(f"wall: {(time.time() - began) / 60:.1f} min (planning and the model {planned - began:.0f} s, cluster start "
          f"{first - planned:.0f} s, the run {(ended - first) / 60:.1f} min of which {ended - last:.0f} s after the last "
          f"row, cluster shutdown {stopped - ended:.0f} s, reading rows {time.time() - stopped:.0f} s)")
    print(f"results: {runs}")


def _faults(driver: subprocess.Popen, cluster: SimCluster, folder: str, runs: Path, scale: float, expected: float) -> float:
    """Remove 2 nodes at 25% of the expected run, kill the driver at 40%, restart it at once,
    add the nodes back at 60%. Returns node-seconds the cluster was without them."""
    start = time.time()

    def at(fraction: float) -> None:
        time.sleep(max(0.0, start + fraction * expected - time.time()))

    at(0.25)
    cluster.remove(2)
    removed = time.time()
    print(f"[{removed - start:.0f} s] removed 2 nodes", flush=True)
    at(0.40)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    print(f"[{time.time() - start:.0f} s] SIGKILLed the driver; running the same command again", flush=True)
    driver = run_driver(folder, cluster.cluster.address, runs, scale)
    at(0.60)
    cluster.workers += [cluster.add(), cluster.add()]
    back = time.time()
    print(f"[{back - start:.0f} s] added 2 nodes back", flush=True)
    driver.wait()
    return 2 * (back - removed)


if __name__ == "__main__":
    main()

"""The orchestrator's own cost: N no-op trials through the same code path as a real sweep
(planner, Ray Tune with reused actors, per-trial Parquet rows, MLflow mirror), then a check that
every trial landed exactly once. Goal: 2,000 trials in under 5 minutes on the 2-core machine.

    python bench/orchestrator_overhead.py [--trials 2000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from orchestrator.planner import plan_sweep
from orchestrator.results import SweepPaths, read_rows
from orchestrator.sweep_runner import RunOptions, run_sweep

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--cpus", type=float, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(SWEEP.format(trials=args.trials))
        t0 = time.perf_counter()
        plan = plan_sweep(path)
        t_plan = time.perf_counter() - t0
        t0 = time.perf_counter()
        counts = run_sweep(path, RunOptions(runs_dir=f"{tmp}/runs", num_cpus=args.cpus, dashboard=False, noop=True),
                           Console(file=open(os.devnull, "w")))
        t_run = time.perf_counter() - t0
        rows = read_rows(SweepPaths(f"{tmp}/runs", "overhead").trials)
        ids = [r["trial_id"] for r in rows]
    once = len(ids) == len(set(ids)) == len(plan.trials) and counts == {"completed": len(plan.trials)}
    print(f"trials: {len(plan.trials)} planned in {t_plan:.1f} s; run (Ray start, Tune, Parquet, MLflow) in {t_run:.1f} s")
    print(f"throughput: {len(plan.trials) / t_run:.1f} trials/s; overhead {t_run / len(plan.trials) * 1000:.0f} ms per trial")
    print(f"every trial landed exactly once: {once} ({len(ids)} rows, {len(set(ids))} distinct ids)")


if __name__ == "__main__":
    main()

"""Per-trial start-up on this machine, by worker count: what the planner's `startup` term is.

For 1, 2 and 4 workers (gloo: Ray Train's worker group, its process group, data, model build),
a sweep of N one-step micro-xs trials runs one trial at a time through the real orchestrator
(`moe-sweep run` on local Ray); a trial's cost is the time between consecutive trials' ends
(steady state: the first trial, which also starts Tune's actors, is left out), less its one
training step. Each worker count runs in a fresh process with its own Ray. Prints the medians
and the `StartupModel` they give, the numbers in `orchestrator/hardware.py`'s CPU entry.

    python bench/trial_startup.py [--trials 4] [--workers 1 2 4] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SWEEP = """\
name: startup-{workers}
resources: {{cpus: {cpus}, workers: {workers}}}
max_concurrent: 1
seeds: {trials}
base:
  scale: micro-xs
  study: {{sparsity: 4, granularity: 1/4}}
  model: {{vocab_size: 300}}
  train: {{steps: 1, batch_tokens: 1024, micro_batch_size: 1, eval_every: 1, eval_tokens: 256}}
  data: {{source: bible, tokenizer: bytes, cache_dir: "{cache}"}}
"""


def _one(workers: int, trials: int, cpus: float, cache: str, out: Path) -> list[float]:
    """Trial end times of one run, in a fresh process (its own Ray)."""
    yaml = out / f"startup_{workers}.yaml"
    yaml.write_text(SWEEP.format(workers=workers, cpus=min(1.0, cpus / workers), trials=trials, cache=cache))
    code = textwrap.dedent(f"""
        import json, os
        from rich.console import Console
        from orchestrator.results import SweepPaths, read_rows
        from orchestrator.sweep_runner import RunOptions, run_sweep
        counts = run_sweep({str(yaml)!r}, RunOptions(runs_dir={str(out / 'runs')!r}, num_cpus={cpus}, dashboard=False),
                           Console(file=open(os.devnull, "w")))
        rows = read_rows(SweepPaths({str(out / 'runs')!r}, "startup-{workers}").trials)
        print(json.dumps({{"counts": counts, "ends": sorted(r["updated_at"] for r in rows),
                           "wall": [r["wall_seconds"] for r in rows]}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["counts"] != {"completed": trials}:
        raise SystemExit(f"{workers} workers: {result['counts']}")
    ends, step = result["ends"], statistics.median(result["wall"])
    return [b - a - step for a, b in zip(ends, ends[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cpus", type=float, default=2.0)
    args = parser.parse_args()
    from moe_core.data.tokens import trial_tokenizer  # noqa: F401  (imports before any timing)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cache = str(out / "cache")
        seconds = {}
        for w in args.workers:
            costs = _one(w, args.trials, args.cpus, cache, out)
            seconds[w] = statistics.median(costs)
            print(f"start-up, {w} worker{'s' * (w > 1)}: {seconds[w]:.1f} s per trial "
                  f"(median of {len(costs)}: {', '.join(f'{c:.1f}' for c in costs)})", flush=True)
    if {1, 2, 4} <= set(seconds):
        per = max(0.0, (seconds[4] - seconds[2]) / math.log2(2))
        print(f"StartupModel(single={seconds[1]:.1f}, group={seconds[2]:.1f}, per_doubling={per:.1f})  "
              "# orchestrator/hardware.py, the CPU entry")


if __name__ == "__main__":
    main()

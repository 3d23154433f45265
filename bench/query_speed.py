"""Query latency over result tables of the size of the full study: 2,000 trials x 1,000 steps,
laid out as `moe-sweep run` writes them (one Parquet file per trial per table). Goal: typical
queries answer in well under a second.

    python bench/query_speed.py [--trials 2000] [--steps 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from analysis.tables import connect

QUERIES = {
    "best per layout": "select layout, min(val_loss) from trials where status = 'completed' group by 1",
    "loss vs S by scale": "select scale, sparsity, avg(val_loss), count(*) from trials group by 1, 2 order by 1, 2",
    "final steps join": "select t.layout, avg(s.train_loss) from steps s join trials t using (trial_id) where s.step = 1000 group by 1",
    "curve of one trial": "select step, train_loss, val_loss from steps where trial_id = 't01234' order by step",
    "per-step means": "select step, avg(train_loss) from steps group by 1 order by 1",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs" / "big" / "tables"
        (root / "trials").mkdir(parents=True)
        (root / "steps").mkdir(parents=True)
        t0 = time.perf_counter()
        for i in range(args.trials):
            tid = f"t{i:05d}"
            pq.write_table(pa.table({
                "trial_id": [tid], "sweep": ["big"], "status": ["completed"], "scale": [f"s{i % 5}"],
                "layout": [["dense", "layerwise", "unipool"][i % 3]], "sparsity": [float(2 ** (i % 8))],
                "val_loss": [3.0 + rng.normal()],
            }), root / "trials" / f"{tid}.parquet")
            step = np.arange(1, args.steps + 1)
            pq.write_table(pa.table({
                "trial_id": [tid] * args.steps, "step": step, "train_loss": 3 + 1 / step + rng.normal(0, 0.01, args.steps),
                "val_loss": np.where(step % 100 == 0, 3.0, np.nan),
            }), root / "steps" / f"{tid}.parquet")
        print(f"wrote {args.trials} trials x {args.steps} steps in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        con = connect(Path(tmp) / "runs")
        print(f"load both tables ({args.trials} + {args.trials * args.steps:,} rows): {time.perf_counter() - t0:.3f} s")
        for name, sql in QUERIES.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                con.execute(sql).df()
                times.append(time.perf_counter() - t0)
            print(f"{name:22s} best {min(times):.3f} s  (first {times[0]:.3f} s)")


if __name__ == "__main__":
    main()

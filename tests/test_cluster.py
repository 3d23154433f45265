"""The whole queue on a multi-node cluster of fake-GPU nodes, simulated (`--simulate`): two
sweeps in one queue, per-trial shapes, a node lost while its trials run; exactly one row each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deps import require

require("ray", "optuna", "mlflow")

from orchestrator.results import SweepPaths, read_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

SWEEP = """\
name: {name}
resources: {{cpus: 1, gpus: 1{workers}}}
hardware: h100
seeds: {seeds}
retries: 1
base:
  scale: micro-xs
  study: {{sparsity: 4, granularity: 1/4}}
  model: {{vocab_size: 300}}
  train: {{steps: 8, batch_tokens: 2048, micro_batch_size: 4, eval_every: 2, checkpoint_every: 2}}
  data: {{source: bible, tokenizer: bytes}}
parameters:
  study.sparsity: {{values: [2, 4]}}
"""


def test_simulated_queue_survives_a_lost_node(tmp_path):
    from ray.cluster_utils import Cluster

    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "narrow.yaml").write_text(SWEEP.format(name="narrow", workers="", seeds=4))
    (folder / "wide.yaml").write_text(SWEEP.format(name="wide", workers=", workers: 2", seeds=1))
    runs = tmp_path / "runs"
    os.environ.update({"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(3)]
    cluster.wait_for_nodes()
    try:
        # 45 s of planned start-up per narrow trial x 0.1: about 4.5 s each, 7.5 s for a wide one.
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", str(folder), "--address", cluster.address, "--simulate", "0.1",
             "--runs-dir", str(runs), "--no-dashboard"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lost = _remove_a_busy_node(cluster, nodes, runs)
        cluster.add_node(num_cpus=2, num_gpus=2)
        out, _ = driver.communicate(timeout=240)
        assert driver.returncode == 0, out[-3000:]
    finally:
        cluster.shutdown()
    rows = {name: read_rows(SweepPaths(runs, name).trials) for name in ("narrow", "wide")}
    assert {n: len(r) for n, r in rows.items()} == {"narrow": 8, "wide": 2}  # one row per planned trial
    every = [r for rs in rows.values() for r in rs]
    assert {r["status"] for r in every} == {"completed"} and all(r["simulated"] for r in every)
    assert {r["workers"] for r in rows["wide"]} == {2} and {r["placement"] for r in rows["wide"]} == {"STRICT_PACK"}
    # The trials on the lost node ran again (continuing from their checkpoint) elsewhere.
    again = [r for r in every if r["attempts"] > 1]
    assert again, f"no trial restarted after node {lost} was removed"
    assert all(r["ray_node_id"] != lost for r in again)
    # The same command again: nothing left to run.
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(folder), "--runs-dir", str(runs)],
                          cwd=ROOT, capture_output=True, text=True)
    assert "all 2 sweeps: 10 planned trials: completed 10" in done.stdout


def _remove_a_busy_node(cluster, nodes, runs: Path, timeout: float = 120) -> str:
    """Wait until a trial runs on a worker node, then remove that node (its processes die)."""
    by_id = {n.node_id: n for n in nodes}
    end = time.time() + timeout
    while time.time() < end:
        for name in ("narrow", "wide"):
            for r in read_rows(SweepPaths(runs, name).trials) if (runs / name / "tables").exists() else []:
                if r["status"] == "running" and r.get("ray_node_id") in by_id:
                    time.sleep(1.0)  # past its first checkpoint
                    cluster.remove_node(by_id[r["ray_node_id"]], allow_graceful=False)
                    return r["ray_node_id"]
        time.sleep(0.2)
    raise AssertionError("no trial started on a worker node")

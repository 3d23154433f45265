"""Sweeps on Ray end to end: grid and Bayesian search, failures, SIGKILL and resume, extension,
a two-node cluster and a two-worker data-parallel trial. Local Ray, 2 CPUs, tiny trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from tests.deps import require

require("ray", "optuna", "mlflow")

from orchestrator.results import SweepPaths, read_rows, read_table
from orchestrator.sweep_runner import RunOptions, run_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def sweep_yaml(tmp_path: Path, cache: Path, parameters: str, name: str = "t", head: str = "", steps: int = 6,
               extra_train: str = "") -> Path:
    text = f"name: {name}\nresources: {{cpus: 1}}\nmax_concurrent: 2\n{head}\n" + textwrap.dedent(f"""\
        base:
          scale: micro-xs
          study: {{sparsity: 4, granularity: 1/4}}
          model: {{vocab_size: 300}}
          train: {{steps: {steps}, batch_tokens: 1024, micro_batch_size: 4, eval_every: 2, eval_tokens: 1024, checkpoint_every: 2{extra_train}}}
          data: {{source: bible, tokenizer: bytes, cache_dir: "{cache}"}}
        parameters:
        """) + textwrap.indent(textwrap.dedent(parameters), "  ")
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def options(tmp_path: Path, **kw) -> RunOptions:
    return RunOptions(runs_dir=str(tmp_path / "runs"), num_cpus=2, dashboard=False, **kw)


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"))


def _mlflow_trials(runs: Path, sweep: str) -> dict[str, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(sweep)
    runs_ = client.search_runs([exp.experiment_id])
    parents = [r for r in runs_ if r.data.tags.get("moe_sweep.role") == "sweep"]
    assert len(parents) == 1
    out = {}
    for r in runs_:
        if r.data.tags.get("moe_sweep.role") == "trial":
            assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            history = client.get_metric_history(r.info.run_id, "train_loss")
            out[r.data.tags["trial_id"]] = {"status": r.data.tags["status"], "metrics": r.data.metrics, "steps": len(history)}
    return out


def test_grid_sweep_with_a_failing_trial(tmp_path, cache):
    # vocab_size 200 is smaller than the byte tokenizer's 257 ids: that trial raises when it starts.
    path = sweep_yaml(tmp_path, cache, """\
        study.layout: {values: [dense, layerwise]}
        model.vocab_size: {values: [300, 200]}
        """, head="retries: 1")
    counts = run_sweep(path, options(tmp_path), quiet())
    assert counts == {"completed": 2, "failed": 2}
    paths = SweepPaths(tmp_path / "runs", "t")
    rows = {r["trial_id"]: r for r in read_rows(paths.trials)}
    assert len(rows) == 4
    for row in rows.values():
        if row["status"] == "failed":
            assert row["vocab_size"] == 200 and "vocab_size (200) is smaller" in row["error"]
        else:
            assert row["steps"] == 6 and row["val_loss"] > 0 and row["error"] is None
    assert len({r["active_params"] for r in rows.values() if r["vocab_size"] == 300}) == 1  # FLOP-matched
    steps = read_table(tmp_path / "runs", "steps").to_pylist()
    done = [tid for tid, r in rows.items() if r["status"] == "completed"]
    for tid in done:
        assert [s["step"] for s in steps if s["trial_id"] == tid] == [1, 2, 3, 4, 5, 6]
    logged = _mlflow_trials(tmp_path / "runs", "t")
    assert set(logged) == set(rows)
    for tid in done:
        assert logged[tid]["status"] == "completed" and logged[tid]["steps"] == 6
        assert logged[tid]["metrics"]["final.val_loss"] == pytest.approx(rows[tid]["val_loss"])
    # Running it again runs nothing finished; failed trials are tried again.
    before = {tid: rows[tid]["updated_at"] for tid in done}
    counts = run_sweep(path, options(tmp_path), quiet())
    after = {r["trial_id"]: r for r in read_rows(paths.trials)}
    assert len(after) == 4 and all(after[tid]["updated_at"] == before[tid] for tid in done)
    assert len(_mlflow_trials(tmp_path / "runs", "t")) == 4


def test_bayes_sweep_with_optuna_and_infeasible_points(tmp_path, cache):
    import optuna

    path = sweep_yaml(tmp_path, cache, """\
        study.granularity: {values: [1, 1/4, 1/64]}
        train.lr: {distribution: log_uniform, min: 1.0e-3, max: 1.0e-2}
        """, name="b", head="method: bayes\ntrials: 6\nsearch_seed: 1")
    run_sweep(path, options(tmp_path), quiet())
    rows = read_rows(SweepPaths(tmp_path / "runs", "b").trials)
    study = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'runs' / 'b' / 'optuna.db'}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 6 and len(rows) <= 6
    infeasible = [r for r in rows if r["status"] == "infeasible"]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == sum(t.params["study.granularity"] == "1/64" for t in study.trials)
    assert all("expert_alignment" in r["error"] for r in infeasible)
    completed = [r for r in rows if r["status"] == "completed"]
    values = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert values == pytest.approx(sorted(r["val_loss"] for r in completed))
    logged = _mlflow_trials(tmp_path / "runs", "b")
    assert {r["trial_id"] for r in completed} <= set(logged)
    # Extending the budget samples only the missing points; the study keeps its history.
    path.write_text(path.read_text().replace("trials: 6", "trials: 8"))
    run_sweep(path, options(tmp_path), quiet())
    study = optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'runs' / 'b' / 'optuna.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 8


def test_sigkill_then_resume_gives_one_row_per_trial(tmp_path, cache):
    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [1, 2, 4, 8]}\n", name="k", steps=24,
                      extra_train=", eval_every: 4, checkpoint_every: 4")
    path.write_text(path.read_text().replace("eval_every: 2, eval_tokens: 1024, checkpoint_every: 2, ", ""))
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", str(path), "--runs-dir", str(runs), "--num-cpus", "2",
           "--no-dashboard"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    paths = SweepPaths(runs, "k")
    deadline = time.time() + 240
    interrupted = None
    while time.time() < deadline:
        rows = read_rows(paths.trials) if paths.trials.exists() else []
        running = [r for r in rows if r["status"] == "running"
                   and (paths.trial_dir(r["trial_id"]) / "checkpoints" / "latest").exists()]
        if any(r["status"] == "completed" for r in rows) and running:
            interrupted = running[0]["trial_id"]
            break
        time.sleep(0.2)
    assert interrupted, "the sweep never had a finished and a checkpointed running trial"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = {r["trial_id"]: r for r in read_rows(paths.trials)}
    done_before = {tid: r["updated_at"] for tid, r in before.items() if r["status"] == "completed"}
    pids = json.loads(paths.pids.read_text())
    assert pids, "the driver recorded the Ray processes it started"

    counts = run_sweep(path, options(tmp_path), quiet())
    assert counts == {"completed": 4}
    rows = {r["trial_id"]: r for r in read_rows(paths.trials)}
    assert len(rows) == 4 and all(rows[tid]["updated_at"] == t for tid, t in done_before.items())
    import psutil

    for entry in pids:  # what the killed driver started is gone
        alive = psutil.pid_exists(entry["pid"]) and abs(psutil.Process(entry["pid"]).create_time() - entry["create_time"]) < 0.01
        assert not alive, entry
    steps = [s["step"] for s in pq.read_table(paths.steps / f"{interrupted}.parquet").to_pylist()]
    assert steps == list(range(1, 25))  # resumed from its checkpoint: every step once


def test_extended_yaml_runs_only_new_trials(tmp_path, cache):
    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [2, 4]}\n", name="e")
    run_sweep(path, options(tmp_path), quiet())
    paths = SweepPaths(tmp_path / "runs", "e")
    first = {r["trial_id"]: r["updated_at"] for r in read_rows(paths.trials)}
    path.write_text(path.read_text().replace("[2, 4]", "[2, 4, 8]"))
    run_sweep(path, options(tmp_path), quiet())
    rows = {r["trial_id"]: r for r in read_rows(paths.trials)}
    assert len(rows) == 3 and set(first) < set(rows)
    assert all(rows[tid]["updated_at"] == t for tid, t in first.items())


def test_two_node_cluster_runs_trials_on_both_nodes(tmp_path, cache):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [1, 2, 4, 8]}\n", name="c", steps=8)
        counts = run_sweep(path, RunOptions(runs_dir=str(tmp_path / "runs"), address=cluster.address), quiet())
        assert counts == {"completed": 4}
        nodes = {r["ray_node_id"] for r in read_rows(SweepPaths(tmp_path / "runs", "c").trials)}
        assert len(nodes) == 2
    finally:
        cluster.shutdown()


def test_two_worker_trial_runs_data_parallel(tmp_path, cache):
    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [4]}\n", name="dp")
    path.write_text(path.read_text().replace("resources: {cpus: 1}", "resources: {cpus: 1, workers: 2}")
                    .replace("batch_tokens: 1024", "batch_tokens: 2048"))
    counts = run_sweep(path, options(tmp_path), quiet())
    assert counts == {"completed": 1}
    row = read_rows(SweepPaths(tmp_path / "runs", "dp").trials)[0]
    # The same trial on one worker, outside Ray: two gloo workers reproduce its losses.
    from moe_core.train.loop import train_trial
    from moe_core.trial import TrialConfig

    single = train_trial(TrialConfig.from_dict(json.loads(row["config_json"])), tmp_path / "single")
    assert row["val_loss"] == pytest.approx(single.val_loss, rel=1e-4)
    # Planned, reserved and run as a two-worker gang on one node.
    assert (row["workers"], row["placement"]) == (2, "STRICT_PACK")


def test_mlflow_down_loses_nothing_and_status_reports(tmp_path, cache, capsys):
    from orchestrator.cli import main

    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [2, 4]}\n", name="m")
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    counts = run_sweep(path, options(tmp_path, mlflow_uri="http://127.0.0.1:9"), console)
    assert counts == {"completed": 2}
    assert "MLflow not updated" in console.export_text()
    runs = tmp_path / "runs"
    assert not (runs / "mlflow.db").exists()
    # The next run finds nothing to train and logs the finished trials to the (default) store.
    run_sweep(path, options(tmp_path), quiet())
    assert set(_mlflow_trials(runs, "m")) == {r["trial_id"] for r in read_rows(SweepPaths(runs, "m").trials)}
    assert main(["status", "m", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "best val_loss" in out
    assert main(["status", "nope", "--runs-dir", str(runs)]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err


def test_resources_the_cluster_lacks_are_a_clear_error(tmp_path, cache):
    from moe_core.errors import ConfigError

    path = sweep_yaml(tmp_path, cache, "study.sparsity: {values: [2]}\n", name="g")
    path.write_text(path.read_text().replace("resources: {cpus: 1}", "resources: {cpus: 1, gpus: 1}"))
    with pytest.raises(ConfigError, match="each worker needs 1 GPUs but the Ray cluster has 0"):
        run_sweep(path, options(tmp_path), quiet())

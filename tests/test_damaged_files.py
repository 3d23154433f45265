"""Result files damaged from outside (truncated, empty, not Parquet, another table's): every
reader leaves them out and names them in one line; `moe-sweep run` sets them aside and repairs
them, ending with exactly one good row per planned trial and nothing else lost."""

from __future__ import annotations

import json
import warnings

import pyarrow.parquet as pq
import pytest

from moe_core.files import DamagedFileWarning, write_parquet
from orchestrator.results import DamagedFile, SweepPaths, read_rows, read_rows_of, scan_rows, write_row
from tests.deps import require

# Each kind of damage a file on shared storage meets, as bytes written over a good file.
DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "empty": lambda good: b"",
    "not parquet": lambda good: b'{"trial_id": "x"}\n',
}


def _row(tid: str, loss: float = 2.0) -> dict:
    return {"trial_id": tid, "sweep": "s", "status": "completed", "val_loss": loss}


def _sweep(tmp_path, n: int = 3) -> SweepPaths:
    paths = SweepPaths(tmp_path / "runs", "s")
    paths.make()
    for i in range(n):
        write_row(paths.trials / f"t{i}.parquet", _row(f"t{i}", 2.0 + i))
        write_parquet(paths.steps / f"t{i}.parquet", [{"trial_id": f"t{i}", "step": s, "train_loss": 3.0 - s / 10} for s in (1, 2)])
    return paths


def _damage(file, kind: str) -> None:
    if kind == "another table's":  # whole Parquet, but a steps file where a trials row belongs
        write_parquet(file, [{"step": 1, "train_loss": 1.0}])
    else:
        file.write_bytes(DAMAGE[kind](file.read_bytes()))


KINDS = [*DAMAGE, "another table's"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_trials_file_is_named_and_the_rest_read(tmp_path, kind):
    paths = _sweep(tmp_path)
    _damage(paths.trials / "t1.parquet", kind)
    with pytest.raises(DamagedFile, match="t1.parquet: damaged"):
        read_rows_of(paths.trials / "t1.parquet")
    rows, damaged = scan_rows(paths.trials)
    assert sorted(r["trial_id"] for r in rows) == ["t0", "t2"]
    assert [d.path.name for d in damaged] == ["t1.parquet"]
    assert [r["trial_id"] for r in read_rows(paths.trials)] == ["t0", "t2"]


@pytest.mark.parametrize("kind", KINDS)
def test_queries_leave_damaged_files_out_and_list_them(tmp_path, kind):
    from analysis.tables import connect, query

    paths = _sweep(tmp_path)
    _damage(paths.trials / "t1.parquet", kind)
    _damage(paths.steps / "t2.parquet", kind if kind != "another table's" else "empty")
    with pytest.warns(DamagedFileWarning, match=r"t1\.parquet: damaged .*left out"):
        df = query("select trial_id from trials order by 1", tmp_path / "runs")
    assert df.trial_id.tolist() == ["t0", "t2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedFileWarning)
        con = connect(tmp_path / "runs")
        damaged = sorted(r[0].rsplit("/", 2)[-2] + "/" + r[0].rsplit("/", 1)[-1] for r in con.execute("select file from damaged").fetchall())
        steps = con.execute("select trial_id, count(*) from steps group by 1 order by 1").fetchall()
    assert damaged == ["steps/t2.parquet", "trials/t1.parquet"]
    assert steps == [("t0", 2)]  # t2's steps damaged, t1 has no trials row


def test_a_footer_that_reads_over_data_that_does_not_is_found(tmp_path):
    from analysis.tables import query

    paths = _sweep(tmp_path)
    good = (paths.steps / "t0.parquet").read_bytes()
    meta = pq.ParquetFile(paths.steps / "t0.parquet").metadata
    start = meta.row_group(0).column(0).data_page_offset
    (paths.steps / "t0.parquet").write_bytes(good[:start] + b"\xff" * 64 + good[start + 64:])  # pages overwritten
    with pytest.warns(DamagedFileWarning, match="t0.parquet: damaged"):
        df = query("select distinct trial_id from steps order by 1", tmp_path / "runs")
    assert df.trial_id.tolist() == ["t1", "t2"]


def test_cli_status_and_query_say_one_line_and_go_on(tmp_path, capsys):
    from orchestrator.cli import main

    paths = _sweep(tmp_path)
    _damage(paths.trials / "t1.parquet", "truncated")
    assert main(["query", "select count(*) as n from trials", "--runs-dir", str(tmp_path / "runs"), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["n", "2"]
    assert [line for line in err.splitlines() if line] == [
        line for line in err.splitlines() if line.startswith("moe-sweep: warning: ") and "t1.parquet: damaged" in line]
    assert len([line for line in err.splitlines() if line]) == 1
    assert main(["status", "s", "--runs-dir", str(tmp_path / "runs")]) == 0
    out, _ = capsys.readouterr()
    assert "damaged" in out and "t1.parquet: damaged" in out and "Traceback" not in out


@pytest.mark.slow
def test_run_repairs_rows_and_steps_and_reruns_what_it_cannot_rebuild(tmp_path, cache):
    """A finished sweep of 3 trials: trial A's row truncated (rebuilt from its folder), B's steps
    not Parquet (rebuilt from its metrics), C's steps damaged and its folder's metrics too (C runs
    again from its last checkpoint). Then one good row and steps per trial, the damaged files
    kept, and the other trials' files untouched."""
    require("ray", "optuna", "mlflow")
    from tests.test_orchestrator import options, quiet, sweep_yaml

    from orchestrator.sweep_runner import run_sweep

    path = sweep_yaml(tmp_path, cache, "study.layout: {values: [dense, layerwise]}\n", head="seeds: [0, 1]")
    assert run_sweep(path, options(tmp_path), quiet()) == {"completed": 4}
    paths = SweepPaths(tmp_path / "runs", "t")
    before = {r["trial_id"]: r for r in read_rows(paths.trials)}
    steps_before = {t: pq.read_table(paths.steps / f"{t}.parquet").to_pylist() for t in before}
    a, b, c, d = sorted(before)
    _damage(paths.trials / f"{a}.parquet", "truncated")
    _damage(paths.steps / f"{b}.parquet", "not parquet")
    _damage(paths.steps / f"{c}.parquet", "empty")
    _damage(paths.trial_dir(c) / "metrics.parquet", "truncated")
    untouched = (paths.trials / f"{d}.parquet").read_bytes()

    assert run_sweep(path, options(tmp_path), quiet()) == {"completed": 4}
    after = {r["trial_id"]: r for r in read_rows(paths.trials)}
    assert sorted(after) == sorted(before) and scan_rows(paths.trials)[1] == [] and scan_rows(paths.steps, "steps")[1] == []
    for key in ("val_loss", "train_loss", "steps", "status", "config_json"):
        assert after[a][key] == before[a][key]  # rebuilt as the trial wrote it
    assert after[c]["val_loss"] == pytest.approx(before[c]["val_loss"])  # resumed at its end: nothing retrained
    for t in (b, c):
        assert pq.read_table(paths.steps / f"{t}.parquet").to_pylist() == steps_before[t]
    assert (paths.trials / f"{d}.parquet").read_bytes() == untouched
    kept = sorted(p.relative_to(paths.root / "damaged").parent.as_posix() + "/" + p.name.split(".parquet")[0]
                  for p in (paths.root / "damaged").rglob("*.parquet.*"))
    assert kept == sorted([f"tables/trials/{a}", f"tables/steps/{b}", f"tables/steps/{c}"])
    assert json.loads((paths.trial_dir(c) / "summary.json").read_text())["status"] == "completed"

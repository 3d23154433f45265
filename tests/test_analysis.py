"""analysis: queries over result tables, findings on planted and null synthetic tables, the report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.deps import require

require("matplotlib")

from analysis import AnalysisError, load_steps, load_trials, query, sweeps
from analysis.findings import CONTRADICTED, INCONCLUSIVE, REPRODUCED, all_findings
from analysis.report import write_report
from analysis.synthetic import synthetic_trials
from orchestrator.cli import main
from moe_core.files import write_parquet
from orchestrator.results import write_row

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def write_runs(runs: Path, trials: pd.DataFrame, steps: pd.DataFrame) -> None:
    """Synthetic tables laid out as `moe-sweep run` writes them: one file per trial."""
    for row in trials.to_dict("records"):
        row = {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        write_row(runs / row["sweep"] / "tables" / "trials" / f"{row['trial_id']}.parquet", row)
    for tid, g in steps.groupby("trial_id"):
        sweep = tid.rsplit("-", 1)[0]
        write_parquet(runs / sweep / "tables" / "steps" / f"{tid}.parquet", g.to_dict("records"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    write_runs(path, *synthetic_trials(planted=True))
    return path


# -- query ------------------------------------------------------------------------------------
def test_views_over_all_sweeps_or_one(runs):
    assert sweeps(runs) == ["balancing", "dropping", "expert-count", "granularity", "hetero", "pathmoe", "shared", "threshold", "unipool"]
    all_trials = load_trials(runs)
    assert len(all_trials) == len(synthetic_trials(planted=True)[0])
    one = query("select count(*) as n, min(sweep) as s from trials", runs, "dropping")
    assert one["n"][0] == 2 * (1 + 3 * 2) * 3 and one["s"][0] == "dropping"  # scales x (dropless + CF x overflow) x seeds
    by = query("select layout, count(*) as n from trials group by 1 order by 1", runs)
    assert set(by["layout"]) == {"dense", "layerwise", "unipool"}
    steps = load_steps(runs, "pathmoe")
    assert {"trial_id", "step", "routing/jaccard"} <= set(steps.columns)
    joined = query('select t.router_block_size as b, avg(s."routing/jaccard") as j from steps s join trials t using (trial_id) group by 1 order by 1', runs, "pathmoe")
    assert list(joined["b"]) == [1, 2, 4] and joined["j"].is_monotonic_increasing


@pytest.mark.parametrize("call, message", [
    (lambda r: query("select nope from trials", r), "SQL error: Binder Error"),
    (lambda r: query("select val_los from trials", r), 'Candidate bindings: "val_loss"'),  # DuckDB's hint kept
    (lambda r: query("drop table trials", r), "queries are read-only (SELECT, WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); got DROP"),
    (lambda r: query("select 1; insert into trials (trial_id) values ('x')", r), "read-only"),
    (lambda r: query("copy trials to 'out.csv'", r), "got COPY"),
    (lambda r: query("select * from read_csv('/etc/hostname')", r), "SQL error"),  # no files beyond the tables
    (lambda r: query("selec 1", r), "SQL error: Parser Error"),
    (lambda r: load_trials(r, "missing"), "no results for sweep 'missing'"),
    (lambda r: load_trials(r / "empty"), "no sweep results under"),
])
def test_mistakes_are_one_line_errors(runs, call, message):
    with pytest.raises(AnalysisError) as err:
        call(runs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_query_cli_formats(runs, tmp_path, capsys):
    sql = "select sweep, count(*) as n from trials group by 1 order by 1"
    assert main(["query", sql, "--runs-dir", str(runs), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0] == "sweep,n" and len(csv) == 10
    assert main(["query", sql, "--runs-dir", str(runs), "--format", "json", "--sweep", "hetero"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"sweep": "hetero", "n": 12}]
    out = tmp_path / "q.parquet"
    assert main(["query", sql, "--runs-dir", str(runs), "--format", "parquet", "--out", str(out)]) == 0
    assert len(pd.read_parquet(out)) == 9
    assert main(["query", sql, "--runs-dir", str(runs)]) == 0
    assert "expert-count" in capsys.readouterr().out
    assert main(["query", "select x from trials", "--runs-dir", str(runs)]) == 2
    assert capsys.readouterr().err.startswith("moe-sweep: error: SQL error")


# -- findings ---------------------------------------------------------------------------------
def test_planted_effects_are_found():
    verdicts = {f.key: f.verdict for f in all_findings(*synthetic_trials(planted=True))}
    assert verdicts == {k: REPRODUCED for k in verdicts if k != "scaling"} | {"scaling": "fit"}


def test_no_effect_is_not_reported_as_found():
    findings = {f.key: f for f in all_findings(*synthetic_trials(planted=False, seed=1))}
    for key, f in findings.items():
        if key != "scaling":
            assert f.verdict in (INCONCLUSIVE, CONTRADICTED), (key, f.summary)
    # Balancing's robustness is "small relative to expert count and granularity" (finding 3): with
    # nothing planted those move loss within the noise too, so there is nothing to be small against.
    robust = findings["balancing"].checks[0]
    assert robust.verdict == INCONCLUSIVE and "themselves move loss within the noise" in robust.detail


def test_reversed_effects_are_contradicted():
    trials, steps = synthetic_trials(planted=True)
    flipped = trials.copy()
    drop = (flipped["sweep"] == "dropping") & flipped["capacity_factor"].notna()
    flipped.loc[drop, "val_loss"] -= 0.04 / flipped.loc[drop, "capacity_factor"]  # dropping now "helps"
    moe = (flipped["sweep"] == "expert-count")
    flipped.loc[moe, "val_loss"] = flipped.loc[moe, "val_loss"] + 0.05 * np.log2(flipped.loc[moe, "sparsity"])
    f = {x.key: x for x in all_findings(flipped, steps)}
    assert f["expert_count"].verdict == CONTRADICTED
    assert f["dropless"].verdict == CONTRADICTED


def test_findings_need_their_comparison():
    trials, steps = synthetic_trials(planted=True)
    only = trials[trials["sweep"] == "dropping"]
    f = {x.key: x for x in all_findings(only, steps.iloc[0:0])}
    assert f["dropless"].verdict == REPRODUCED
    assert f["unipool"].verdict == INCONCLUSIVE and "no sweep has both vanilla and UniPool" in f["unipool"].summary
    assert f["probe"].verdict == INCONCLUSIVE


def test_router_dtype_separates_settings_and_older_tables_routed_in_float32():
    from analysis.stats import completed, controlled_groups

    trials, _ = synthetic_trials(planted=True)
    moe = trials[(trials["sweep"] == trials["sweep"].iloc[0]) & trials["router_scoring"].notna()]
    compute = moe.assign(router_dtype="compute", trial_id=moe["trial_id"] + "-c")
    both = completed(pd.concat([moe, compute]))
    assert not set(both[both["router_dtype"] == "compute"]["setting"]) & set(both[both["router_dtype"] == "float32"]["setting"])
    groups = controlled_groups(both, ["num_experts", "sparsity"], primary="sparsity")
    assert groups and all(g["router_dtype"].nunique() == 1 for g in groups)  # never mixed in a comparison
    older = completed(moe.drop(columns="router_dtype"))  # a table written before the column existed
    assert (older["router_dtype"] == "float32").all()
    assert list(older["setting"]) == list(completed(moe)["setting"])


def test_noise_comes_from_repeated_seeds():
    from analysis.stats import completed, seed_noise

    trials, _ = synthetic_trials(planted=True, noise=0.01, seeds=4)
    assert seed_noise(completed(trials)) == pytest.approx(0.01, rel=0.2)
    single, _ = synthetic_trials(planted=True, seeds=1)
    assert seed_noise(completed(single[single["sweep"] == "dropping"])) is None  # no setting repeats


# -- report -----------------------------------------------------------------------------------
def test_report_cli_writes_figures_and_a_self_contained_page(runs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", "--all", "--runs-dir", str(runs), "--out", str(out)]) == 0
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 9
    assert page.count('class="reproduced"') >= 9
    assert page.count("<th>sub-claim</th>") == 9  # each finding's sub-claims with their own verdicts
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert {p.name for p in out.glob("*.png")} >= {"expert_count.png", "granularity.png", "unipool.png", "pathmoe.png"}
    assert main(["report", "pathmoe", "--runs-dir", str(runs), "--out", str(tmp_path / "one")]) == 0
    assert main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "x")]) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image as mpimg

    page = write_report(*synthetic_trials(planted=True), tmp_path / "r", "rendered")
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,3000",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = mpimg.imread(shot)[..., :3]
    not_white = (pixels.mean(axis=-1) < 0.95).mean()
    assert pixels.std() > 0.05 and not_white > 0.05  # text, tables and figures, not a blank page


def test_analysis_imports_no_torch():
    code = "import sys, analysis, analysis.report, analysis.findings, analysis.synthetic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""The sweep planner: expansion, exact FLOP matching, skips with reasons, stable ids, validation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from moe_core.accounting import count_params
from moe_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.planner import Planner, SweepFile, plan_path, plan_sweep
from orchestrator.scales import SCALES
from tests.deps import require

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"

BASE = """\
name: t
method: grid
base:
  scale: micro-xs
  study: {sparsity: 4, granularity: 1/4}
  train: {tokens: 16384, batch_tokens: 4096, micro_batch_size: 8}
"""


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def sweep(tmp_path: Path, parameters: str = "", extra: str = "", base: str = BASE) -> Path:
    return write(tmp_path, base + extra + (f"parameters:\n{textwrap.indent(textwrap.dedent(parameters), '  ')}" if parameters else ""))


# -- expansion --------------------------------------------------------------------------------
def test_grid_expands_product_of_values_times_seeds(tmp_path):
    path = sweep(tmp_path, """\
        study.sparsity: {values: [1, 2, 4, 8]}
        study.granularity: {values: [1, 1/2, 1/4]}
        """, extra="seeds: [0, 1]\n")
    plan = plan_sweep(path)
    assert len(plan.trials) == 4 * 3 * 2 and not plan.skipped
    assert {t.seed for t in plan.trials} == {0, 1}
    combos = {(t.params["study.sparsity"], t.params["study.granularity"]) for t in plan.trials}
    assert len(combos) == 12
    assert plan.configurations == 12  # design points: the seeds replicate them
    assert len({t.trial_id for t in plan.trials}) == 24 and len({t.config_id for t in plan.trials}) == 12
    t = next(t for t in plan.trials if t.params == {"study.sparsity": 8.0, "study.granularity": 0.25})
    assert (t.derived["num_experts"], t.derived["top_k"], t.derived["expert_width"]) == (32, 4, "64")


def test_seed_count_and_variants(tmp_path):
    path = sweep(tmp_path, """\
        arch:
          variants:
            dense: {study.layout: dense}
            fine: {study.granularity: 1/8, study.sparsity: 8}
        """, extra="seeds: 3\n")
    plan = plan_sweep(path)
    assert len(plan.trials) == 6
    assert {t.params["arch"] for t in plan.trials} == {"dense", "fine"}
    fine = next(t for t in plan.trials if t.params["arch"] == "fine")
    assert fine.config.model.moe.experts[0].num_experts == 64 and fine.config.model.moe.top_k == 8


def test_points_resolving_to_one_trial_are_listed_once(tmp_path):
    plan = plan_sweep(sweep(tmp_path, """\
        study.layout: {values: [dense, layerwise]}
        study.sparsity: {values: [2, 4]}
        """))
    assert len(plan.trials) == 3  # dense once, two MoEs
    dup = [s for s in plan.skipped if s.reason.startswith("same resolved trial as")]
    assert len(dup) == 1 and dup[0].params["study.layout"] == "dense"


def test_random_search_is_seeded_and_sized(tmp_path):
    require("ray")  # random points are drawn from Tune's search domains
    text = BASE.replace("method: grid", "method: random\ntrials: 7\nsearch_seed: 3")
    params = """\
        train.lr: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}
        study.sparsity: {values: [2, 4, 8]}
        train.warmup_fraction: {distribution: uniform, min: 0.0, max: 0.1}
        """
    a = plan_sweep(sweep(tmp_path, params, base=text))
    b = plan_sweep(sweep(tmp_path, params, base=text))
    assert len(a.trials) + len(a.skipped) == 7
    assert [t.trial_id for t in a.trials] == [t.trial_id for t in b.trials]
    assert all(1e-4 <= t.config.train.lr <= 1e-2 for t in a.trials)
    assert len({t.config.train.lr for t in a.trials}) == len(a.trials)


def test_random_search_draws_from_the_tune_domains_bounds_inclusive(tmp_path):
    require("ray")
    text = BASE.replace("method: grid", "method: random\ntrials: 60\nsearch_seed: 0")
    params = """\
        train.eval_every: {distribution: int_log_uniform, min: 1, max: 4}
        train.checkpoint_every: {distribution: int, min: 1, max: 3}
        """
    plan = plan_sweep(sweep(tmp_path, params, base=text))
    assert {t.config.train.eval_every for t in plan.trials} == {1, 2, 3, 4}  # max included, as the YAML says
    assert {t.config.train.checkpoint_every for t in plan.trials} == {1, 2, 3}
    assert all(type(t.params["train.eval_every"]) is int for t in plan.trials)  # plain ints, not numpy's


def test_bayes_plan_estimates_budget_without_trials(tmp_path):
    text = BASE.replace("method: grid", "method: bayes\ntrials: 5")
    plan = plan_sweep(sweep(tmp_path, "train.lr: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}\n", base=text))
    assert plan.trials == [] and plan.planned_trials == 5
    assert plan.estimate is not None and plan.train_flops == pytest.approx(5 * plan.estimate.train_flops)


# -- FLOP matching ----------------------------------------------------------------------------
def test_every_library_trial_of_a_scale_is_flop_matched():
    plans = plan_path(SWEEPS)
    assert sum(len(p.trials) for p in plans) > 2000
    groups: dict[tuple, list] = defaultdict(list)
    for plan in plans:
        for t in plan.trials:
            groups[(t.sweep, t.scale)].append(t)
    for key, trials in groups.items():
        assert len({t.active_params for t in trials}) == 1, key
        assert len({t.flops_per_token for t in trials}) == 1, key
        by_budget = defaultdict(set)
        for t in trials:
            budget = (t.params.get("train.tokens_per_active_param"), t.params.get("train.tokens"))
            by_budget[budget].add(t.train_flops)
        assert all(len(v) == 1 for v in by_budget.values()), key
    for t in (t for p in plans for t in p.trials):
        assert t.config.model.moe.active_fraction == pytest.approx(1.0) or not t.config.model.moe.is_moe
        assert t.train_flops == t.flops_per_token * t.train_tokens


def test_matched_quantities_exclude_only_the_router(tmp_path):
    plan = plan_sweep(sweep(tmp_path, "study.sparsity: {values: [1, 8]}\narch: {variants: {d: {study.layout: dense}, m: {}}}\n"
                            .replace("m: {}", "m: {study.layout: layerwise}")))
    dense = next(t for t in plan.trials if t.derived["layout"] == "dense")
    for t in plan.trials:
        counts = count_params(t.config.model)
        assert t.active_params == counts.active - counts.active_router == dense.active_params
        assert t.router_params == counts.active_router
        assert t.flops_per_token + t.router_flops_per_token == counts.flops_per_token
        assert t.total_params == counts.total


def test_token_budget_is_tokens_per_active_param_in_whole_steps(tmp_path):
    base = BASE.replace("train: {tokens: 16384, batch_tokens: 4096, micro_batch_size: 8}",
                        "train: {tokens_per_active_param: 20, batch_tokens: 4096, micro_batch_size: 8}")
    plan = plan_sweep(sweep(tmp_path, "study.granularity: {values: [1, 1/4]}\n", base=base))
    for t in plan.trials:
        assert t.train_tokens % 4096 == 0 and 0 <= t.train_tokens - 20 * t.active_params < 4096
        assert t.config.train.tokens is None  # the trainer derives the same budget by the same rule
        assert t.config.total_steps * 4096 == t.train_tokens


def test_trainer_and_plan_agree_on_every_library_trial():
    """Every trial of sweeps/, rebuilt as the trainer receives it (the resolved config as YAML),
    trains exactly the tokens the plan charged for."""
    from moe_core.trial import TrialConfig

    plans = plan_path(Path(__file__).resolve().parents[1] / "sweeps")
    checked = 0
    for t in (t for p in plans for t in p.trials):
        rebuilt = TrialConfig.from_dict(yaml.safe_load(yaml.safe_dump(t.config.to_dict())))
        assert rebuilt.total_steps * rebuilt.train.batch_tokens == t.train_tokens, t.trial_id
        checked += 1
    assert checked > 2000


def test_shared_heterogeneous_and_unipool_stay_matched(tmp_path):
    plan = plan_sweep(sweep(tmp_path, """\
        arch:
          variants:
            plain: {study.granularity: 1/4}
            shared: {study.granularity: 1/8, study.shared_experts: 2, study.shared_granularity: 1/4}
            hetero: {study.expert_sets: [{granularity: 1/2, share: 0.5}, {granularity: 1/8, share: 0.5}]}
            pool: {study.layout: unipool, study.pool_fraction: 1/2}
        """))
    by = {t.params["arch"]: t for t in plan.trials}
    assert len({t.active_params for t in by.values()}) == 1
    shared = by["shared"].config.model.moe
    assert (shared.top_k, shared.shared_experts) == (4, 2)  # 4 * 1/8 + 2 * 1/4 = 1
    assert [(s.num_experts, s.top_k) for s in by["hetero"].config.model.moe.experts] == [(4, 1), (16, 4)]
    pool = by["pool"].config.model.moe.experts[0]
    assert (pool.num_experts, pool.top_k) == (4 * 4 * 2 // 2, 4)  # half of S*k experts for each of 2 layers


def test_shared_experts_at_matched_total_parameters(tmp_path):
    """`shared_match: total` raises the routed count so that routed + shared expert parameters
    equal the plain MoE's; `sparsity` keeps n = S k and the total drops."""
    plan = plan_sweep(sweep(tmp_path, """\
        study.shared_experts: {values: [0, 1]}
        study.shared_match: {values: [sparsity, total]}
        """, base=BASE.replace("{sparsity: 4, granularity: 1/4}", "{sparsity: 8, granularity: 1/8, shared_granularity: 1/2}")))
    assert len(plan.trials) == 3 and "same resolved trial" in plan.skipped[0].reason  # plain: one trial
    by = {(t.params["study.shared_experts"], t.params["study.shared_match"]): t for t in plan.trials}
    plain, total, sparsity = by[(0, "sparsity")], by[(1, "total")], by[(1, "sparsity")]
    routed = lambda t: [(s.num_experts, s.top_k) for s in t.config.model.moe.experts]  # noqa: E731
    assert routed(plain) == [(64, 8)] and routed(total) == [(60, 4)] and routed(sparsity) == [(32, 4)]
    held = lambda t: t.total_params - t.router_params  # noqa: E731  (routers score n experts: 60 vs 64)
    assert held(total) == held(plain) > held(sparsity)  # 60/8 + 1/2 = 8 = S
    assert len({t.active_params for t in plan.trials}) == 1


# -- skipped ----------------------------------------------------------------------------------
@pytest.mark.parametrize("params, extra, reason", [
    ("study.granularity: {values: [1/3]}\n", "", "is not a whole number"),  # width 256/3
    ("study.sparsity: {values: [1.5]}\nstudy.granularity: {values: [1]}\n", "", "num_experts = S 1.5 * top_k 1"),
    ("study.granularity: {values: [1/64]}\n", "", "not a multiple of expert_alignment 8"),
    ("study.granularity: {values: [1/4]}\n", "max_total_params: 1.0e5\n", "exceed max_total_params"),
    ("study.shared_experts: {values: [4]}\n", "", "leave no routed width"),
    ("study.pool_fraction: {values: [1/16]}\nstudy.layout: {values: [unipool]}\n", "", "smaller than top_k"),
])
def test_unmatchable_combinations_are_skipped_with_reason(tmp_path, params, extra, reason):
    plan = plan_sweep(sweep(tmp_path, params, extra=extra))
    assert not plan.trials and len(plan.skipped) == 1
    assert reason in plan.skipped[0].reason


# -- identity ---------------------------------------------------------------------------------
def test_trial_ids_stable_across_replans_key_order_and_extension(tmp_path):
    a = plan_sweep(sweep(tmp_path, "study.sparsity: {values: [2, 4]}\n"))
    reordered = textwrap.dedent("""\
        parameters:
          study.sparsity: {values: [2, 4]}
        base:
          train: {micro_batch_size: 8, batch_tokens: 4096, tokens: 16384}
          study: {granularity: 1/4, sparsity: 4}
          scale: micro-xs
        method: grid
        name: t
        """)
    b = plan_sweep(write(tmp_path, reordered, "b.yaml"))
    assert [t.trial_id for t in a.trials] == [t.trial_id for t in b.trials]
    extended = plan_sweep(sweep(tmp_path, "study.sparsity: {values: [2, 4, 8]}\n", extra="seeds: [0, 1]\n"))
    old = {t.trial_id for t in a.trials}
    assert old < {t.trial_id for t in extended.trials} and len(extended.trials) == 6


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    (BASE + "metod: grid\n", "sweep.yaml:7: metod: unknown key; did you mean 'method'?"),
    (BASE.replace("method: grid", "method: gird"), "sweep.yaml:2: method: Input should be 'grid', 'random' or 'bayes'"),
    (BASE + "seeds: many\n", "sweep.yaml:7: seeds"),
    (BASE + "max_concurrent: 0\n", "sweep.yaml:7: max_concurrent: Input should be greater than or equal to 1"),
    (BASE + "parameters:\n  study.sparsty: {values: [1]}\n", "sweep.yaml:8: parameters.study.sparsty: 'study' has no key 'sparsty'; did you mean 'sparsity'?"),
    (BASE + "parameters:\n  modle.d_model: {values: [1]}\n", "'modle' is not a section of base; did you mean 'model'?"),
    (BASE + "parameters:\n  train.lr: {distribution: uniform, min: 0.1, max: 1}\n", "sweep.yaml:8: parameters.train.lr: a range (uniform) cannot be gridded"),
    (BASE + "parameters:\n  train.lr:\n    values: []\n", "sweep.yaml:8: parameters.train.lr: values: empty list"),
    (BASE.replace("scale: micro-xs", "scale: micro-xxl"), "sweep.yaml:4: base.scale: unknown scale 'micro-xxl'; known: micro-xs"),
    (BASE + "parameters:\n  scale: {values: [micro-s, tiny]}\n", "sweep.yaml:8: parameters.scale: unknown scale 'tiny'"),
    (BASE + "parameters:\n  train.lr: {values: [0.01, -1]}\n", "sweep.yaml:8: train.lr: Input should be greater than 0 (at train.lr=-1)"),
    (BASE.replace("micro_batch_size: 8", "micro_batch_size: 8, lr: fast"), "sweep.yaml:6: train.lr: Input should be a valid number"),
    (BASE.replace("study: {", "study: {sparsty: 2, "), "sweep.yaml:5: study.sparsty: unknown key; did you mean 'sparsity'?"),
    (BASE + "name: u\n", "sweep.yaml: line 7: name: duplicate key"),
    (BASE + "trials: 4\n", "trials is for method random or bayes"),
    (BASE.replace("method: grid", "method: bayes"), "method 'bayes' needs trials"),
    (BASE + "base2: 1\n", "base2: unknown key; did you mean 'base'?"),
    (BASE + "resources: {workers: 3}\n", "sweep.yaml:6: train.batch_tokens: 2 micro-batches per step cannot be split over resources.workers = 3"),
    ("name: t\nbase: [1, 2\n", "invalid YAML"),
    (BASE.replace("micro_batch_size: 8", "micro_batch_size: 8, lr: .inf"), "sweep.yaml:6: train.lr: Input should be a finite number"),
    (BASE + "parameters:\n  train.lr: {values: [0.01, .nan]}\n", "train.lr: Input should be a finite number"),
    (BASE + "parameters:\n  train.lr: {distribution: log_uniform, min: 1e-4, max: .inf}\n", "max: Input should be a finite number"),
    (BASE.replace("micro_batch_size: 8", "micro_batch_size: 8, lr: 3"), "train.lr: Input should be less than or equal to 1"),
    (BASE + "parameters:\n  model.moe.balance.aux_weight: {values: [0.01, 10]}\n", "aux_weight: Input should be less than or equal to 1"),
])
def test_user_mistakes_name_file_line_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        plan_sweep(path)
    message = str(err.value)
    assert "\n" not in message
    assert needle in message.replace(str(tmp_path) + "/", "")


def test_duplicate_sweep_names_in_a_folder(tmp_path):
    write(tmp_path, BASE, "a.yaml")
    write(tmp_path, BASE, "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml:1: name: duplicate sweep name 't' \(also in .*a.yaml\)"):
        plan_path(tmp_path)


def test_yaml_is_never_executed(tmp_path):
    path = write(tmp_path, BASE + "description: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        plan_sweep(path)
    assert not (tmp_path / "pwned").exists()


def test_every_sweep_in_the_library_plans():
    files = sorted(SWEEPS.rglob("*.yaml"))
    assert len(files) >= 20
    names = set()
    for file in files:
        plan = plan_sweep(file)
        assert plan.planned_trials > 0, file
        names.add(plan.spec.name)
        if plan.spec.method == "bayes":
            assert plan.estimate is not None, file
    assert len(names) == len(files)


def test_slicing_dicing_covers_the_study_axes():
    plans = {p.spec.name: p for p in plan_path(SWEEPS / "slicing_dicing")}
    assert sum(len(p.trials) for p in plans.values()) >= 2000
    sparsities = {t.params.get("study.sparsity") for t in plans["sd-expert-count"].trials}
    assert 128 in sparsities
    assert max(t.total_params for p in plans.values() for t in p.trials) > 6e9


def test_unipool_scales_match_the_paper():
    published = {"unipool-182m": 777.9e6, "unipool-469m": 2.588e9, "unipool-650m": 3.834e9,
                 "unipool-830m": 5.081e9, "unipool-978m": 5.742e9}
    plans = plan_path(SWEEPS / "unipool" / "main.yaml") + plan_path(SWEEPS / "unipool" / "main_182m.yaml")
    seen = set()
    for t in (t for p in plans for t in p.trials if t.derived["layout"] == "unipool"):
        assert t.derived["num_experts"] == 8 * SCALES[t.scale].model["n_layers"]
        assert abs(t.total_params / published[t.scale] - 1) < 0.0005, t.scale  # vocabulary padded as published
        seen.add(t.scale)
    assert seen == set(published)


# -- command line -----------------------------------------------------------------------------
def test_plan_json(tmp_path, capsys):
    path = sweep(tmp_path, "study.granularity: {values: [1, 1/4, 1/3]}\n")
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["trials"]) == 2 and len(out["skipped"]) == 1
    for t in out["trials"]:
        for key in ("trial_id", "scale", "params", "active_params", "total_params", "flops_per_token",
                    "train_tokens", "train_flops", "config"):
            assert key in t
    assert "reason" in out["skipped"][0] and out["totals"]["trials"] == 2
    assert out["totals"]["configurations"] == 2 and out["sweeps"][0]["configurations"] == 2


def test_a_sweep_with_no_feasible_point_is_refused_by_run(tmp_path, capsys):
    require("ray")  # `moe-sweep run` imports the runner, which needs Ray Tune
    path = sweep(tmp_path, "study.granularity: {values: [1/3, 1/64]}\n")
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "every point of the sweep is infeasible, nothing to run" in err
    assert "is not a whole number" in err and "not a multiple of expert_alignment 8" in err
    assert not (tmp_path / "runs").exists()  # refused before any folder, Ray or MLflow


def test_plan_table_and_errors_exit_2_without_traceback(tmp_path):
    good = sweep(tmp_path, "study.granularity: {values: [1, 1/4]}\n")
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(good)], capture_output=True, text=True)
    assert run.returncode == 0 and "micro-xs" in run.stdout and "totals" in run.stdout
    bad = write(tmp_path, BASE + "parameters:\n  study.sparsty: {values: [1]}\n", "bad.yaml")
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(bad)], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and "bad.yaml:8" in run.stderr


def test_planned_config_round_trips_as_a_trial_yaml(tmp_path):
    from moe_core.trial import load_trial_config

    t = plan_sweep(sweep(tmp_path)).trials[0]
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(t.config.to_dict()))
    assert load_trial_config(tmp_path / "trial.yaml") == t.config
    assert Planner(SweepFile(sweep(tmp_path))).resolve({}, 0).trial_id == t.trial_id


def test_every_library_trial_has_a_partner_for_each_swept_knob():
    """No planned GPU-hour on a trial with nothing to compare against: for each swept parameter
    but the scale, every planned point has another point of its sweep that differs in that
    parameter alone (points that resolved to an already planned trial count as planned)."""
    missing = []
    for plan in plan_path(SWEEPS):
        if plan.spec.method == "bayes":
            continue
        points = {json.dumps(t.params, sort_keys=True, default=str) for t in plan.trials}
        points |= {json.dumps(s.params, sort_keys=True, default=str) for s in plan.skipped if "same resolved trial" in s.reason}
        dicts = [json.loads(p) for p in points]
        for point in (json.loads(json.dumps(t.params, default=str)) for t in plan.trials):
            for name in (n for n in plan.spec.parameters if n != "scale" and n in point):
                if not any(o[name] != point[name] and all(o.get(k) == v for k, v in point.items() if k != name) for o in dicts):
                    missing.append((plan.spec.name, name, point))
    assert not missing, missing[:5]


def test_a_planned_trial_reads_back_from_its_plan_file_as_the_same_typed_record(tmp_path):
    from moe_core.trial import TrialConfig
    from orchestrator.planned import PlannedTrial
    from orchestrator.results import planned_columns

    plan = plan_sweep(SWEEPS / "micro" / "dropping.yaml")
    for t in plan.trials[:4]:
        t.write(tmp_path / f"{t.trial_id}.json")
        back = PlannedTrial.read(tmp_path / f"{t.trial_id}.json")
        assert back == t and isinstance(back.config, TrialConfig) and back.shape == t.shape
        assert back.method == plan.spec.method
        assert planned_columns(back) == planned_columns(t)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads((tmp_path / f"{t.trial_id}.json").read_text()), "est_hours": "soon"}))
    with pytest.raises(ValueError, match="est_hours"):
        PlannedTrial.read(bad)


def test_a_plan_file_written_before_the_record_was_typed_still_gives_its_row(tmp_path):
    """`repair` rebuilds rows of trials finished long ago from their plan files, which held the
    plan as a plain dict (the shape's fields inline, the sweep's method added)."""
    from orchestrator.planned import PlannedTrial
    from orchestrator.results import planned_columns

    plan = plan_sweep(SWEEPS / "micro" / "dropping.yaml")
    t = plan.trials[0]
    old = {k: v for k, v in t.to_dict().items() if k != "method"} | {"method": plan.spec.method}
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = PlannedTrial.read(tmp_path / "old.json")
    assert planned_columns(back) == planned_columns(t)
    assert back.shape.workers == t.shape.workers and back.shape.placement == t.shape.placement


def test_resolved_columns_come_from_the_typed_config():
    from orchestrator.results import resolved_columns

    by = {t.params.get("moe.layout", t.config.model.moe.layout): (t.config.model, resolved_columns(t.config))
          for t in plan_sweep(SWEEPS / "micro" / "unipool.yaml").trials}
    for model, row in by.values():
        assert row["sparsity"] == model.sparsity and row["layout"] == model.moe.layout
        assert row["num_experts"] == model.moe.num_routed_experts and row["top_k"] == model.moe.top_k
    unipool = next(m for m, _ in by.values() if m.moe.layout == "unipool")
    per_layer = unipool.moe.num_routed_experts * unipool.num_pools / len(unipool.moe_layers)
    assert unipool.sparsity == per_layer / unipool.moe.top_k


def test_result_columns_say_how_overflow_was_handled():
    from orchestrator.results import TRIALS_SCHEMA, resolved_columns

    plan = plan_sweep(SWEEPS / "micro" / "dropping.yaml")
    by = {t.params["routing"]: resolved_columns(t.config) for t in plan.trials if t.seed == 0}
    assert (by["dropless"]["capacity_factor"], by["dropless"]["overflow"]) == (None, None)
    assert (by["drop_1_0"]["capacity_factor"], by["drop_1_0"]["overflow"]) == (1.0, "drop")
    assert (by["default_1_0"]["capacity_factor"], by["default_1_0"]["overflow"]) == (1.0, "default_expert")
    assert "overflow" in TRIALS_SCHEMA


# -- memory plan ------------------------------------------------------------------------------
MEMORY_SWEEP = """\
name: mem
method: grid
resources: {{gpus: 1, workers: {workers}, sharding: {sharding}}}
base:
  scale: unipool-182m
  study: {{layout: unipool, sparsity: 8, granularity: 1}}
  model: {{moe: {{router: {{scoring: norm}}}}}}
  train: {{steps: 10, batch_tokens: 8388608, micro_batch_size: 8}}
parameters:
  point:
    variants:
      small: {{scale: unipool-182m}}
      big: {{scale: unipool-978m}}
      huge_batch: {{scale: unipool-182m, train.micro_batch_size: 1024}}
"""


def _memory_plan(tmp_path, workers: int, sharding: str = "auto"):
    plan = plan_sweep(write(tmp_path, MEMORY_SWEEP.format(workers=workers, sharding=sharding)))
    return {t.params["point"]: t for t in plan.trials}, {s.params["point"]: s.reason for s in plan.skipped}


def test_memory_plan_picks_the_smallest_sharding_that_fits(tmp_path):
    planned, skipped = _memory_plan(tmp_path, workers=1)
    assert planned["small"].sharding == "none" and planned["small"].config.train.sharding == "none"
    assert 0 < planned["small"].memory_per_gpu < 76e9
    # 5.74B parameters: fp32 weights, gradients and AdamW moments alone are 92 GB.
    assert skipped["big"].startswith("needs ") and "with 1 worker" in skipped["big"]
    assert "fits with fsdp over 8" in skipped["big"] and skipped["big"].endswith("on h100")
    assert "fits nowhere" in skipped["huge_batch"]  # activations are per worker: sharding cannot help
    planned, skipped = _memory_plan(tmp_path, workers=8)
    assert planned["small"].sharding == "none"  # fits replicated: DDP stays the default
    assert planned["big"].sharding == "fsdp" and planned["big"].config.train.sharding == "fsdp"
    assert planned["big"].memory["sharding"] == "fsdp" and planned["big"].memory_per_gpu < 76e9
    planned, skipped = _memory_plan(tmp_path, workers=8, sharding="none")
    assert set(planned) == {"small"} and "with DDP over 8 workers" in skipped["big"]


def test_memory_plan_in_json_and_bad_sharding_is_one_line(tmp_path, capsys):
    path = write(tmp_path, MEMORY_SWEEP.format(workers=8, sharding="auto"))
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    big = next(t for t in out["trials"] if t["params"]["point"] == "big")
    assert big["sharding"] == "fsdp" and big["memory"]["total"] > big["memory"]["weights"] > 0
    assert out["sweeps"][0]["largest_memory_per_gpu"] == big["memory"]["total"]
    bad = write(tmp_path, MEMORY_SWEEP.format(workers=1, sharding="zero3"), name="bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml:3.*resources.sharding.*'auto', 'none' or 'fsdp'"):
        plan_sweep(bad)


def test_no_library_trial_is_planned_into_a_setup_that_does_not_fit():
    from moe_core.memory import usable_bytes
    from orchestrator.hardware import HARDWARE

    checked = 0
    for plan in plan_path(SWEEPS):
        for t in plan.trials if plan.spec.resources.gpus > 0 else ():
            assert t.memory_per_gpu <= usable_bytes(HARDWARE[t.hardware].memory_bytes), t.trial_id
            checked += 1
    assert checked > 2000


def test_train_sharding_is_the_planners_to_choose(tmp_path):
    path = sweep(tmp_path, base=BASE.replace("micro_batch_size: 8}", "micro_batch_size: 8, sharding: fsdp}"))
    with pytest.raises(ConfigError, match=r"sweep.yaml:\d+.*train.sharding is chosen by the planner; set resources.sharding"):
        plan_sweep(path)

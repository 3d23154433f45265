"""A GPU shape per trial: the fewest workers that fit, raised while too long, gang placement; the
queue's order and what each trial asks Ray for; the cluster model; simulated rows kept apart."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from moe_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.cluster_model import ORDERS, Job, best_queue, longest_first, simulate, start_gaps, widest_first
from orchestrator.hardware import HARDWARE
from orchestrator.planner import SweepFile, plan_sweep
from orchestrator.shapes import FEWEST_NODES, ONE_NODE, TrialShape, worker_ladder

ROOT = Path(__file__).resolve().parents[1]

STUDY = """\
name: s
resources: {{cpus: 8, gpus: 1{extra}}}
base:
  scale: {scale}
  study: {{sparsity: {sparsity}, granularity: 1}}
  train: {{batch_tokens: 524288, micro_batch_size: 8}}
  data: {{source: files, paths: ["x/*.jsonl"], tokenizer: gpt2}}
"""


def planned(tmp_path: Path, scale: str = "study-20m", sparsity: int = 8, extra: str = ""):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(scale=scale, sparsity=sparsity, extra=extra))
    plan = plan_sweep(SweepFile(path))
    assert len(plan.trials) == 1, plan.skipped
    return plan.trials[0]


def test_ladder_is_powers_of_two_up_to_a_node_then_whole_nodes():
    assert worker_ladder(8, limit=4) == [1, 2, 4, 8, 16, 24, 32]
    assert worker_ladder(6, limit=2) == [1, 2, 4, 6, 12]


def test_a_small_trial_gets_one_gpu_a_large_one_a_node(tmp_path):
    small = planned(tmp_path, "study-20m")
    assert (small.shape.workers, small.shape.gpus, small.shape.placement) == (1, 1, ONE_NODE)
    assert small.memory_per_gpu < HARDWARE["h100"].memory_bytes
    # study-1b at S = 4: a day and more on fewer GPUs, so raised to a node (8) while it stays
    # above the efficiency floor; its planned hours are then under max_hours.
    large = planned(tmp_path, "study-1b", sparsity=4)
    assert large.shape.workers == 8 and large.shape.placement == ONE_NODE
    assert large.est_hours <= 24
    h = HARDWARE["h100"]
    assert h.hours(large.train_flops, 4, 8) > 24 >= h.hours(large.train_flops, 8, 8)


def test_max_hours_and_efficiency_floor_bound_the_raise(tmp_path):
    fewest = planned(tmp_path, "study-1b", sparsity=4, extra=", max_hours: 10000")
    assert fewest.shape.workers < 8  # no raise: the fewest that fit
    assert fewest.sharding == "fsdp"  # 1b at S = 4 does not fit one GPU replicated
    wide = planned(tmp_path, "study-1b", sparsity=4, extra=", max_hours: 1, min_efficiency: 0.5")
    assert wide.shape.workers > 8 and wide.shape.workers % 8 == 0 and wide.shape.placement == FEWEST_NODES
    # A floor just above the efficiency of that rung stops the raise below it.
    eff = HARDWARE["h100"].dp_efficiency(wide.shape.workers, 8)
    floor = planned(tmp_path, "study-1b", sparsity=4, extra=f", max_hours: 1, min_efficiency: {eff + 1e-6}")
    assert floor.shape.workers < wide.shape.workers
    assert HARDWARE["h100"].dp_efficiency(floor.shape.workers, 8) >= eff


def test_explicit_workers_stay_fixed(tmp_path):
    t = planned(tmp_path, "study-20m", extra=", workers: 4")
    assert t.shape.workers == 4 and t.shape.gpus == 4
    assert t.est_hours == pytest.approx(HARDWARE["h100"].hours(t.train_flops, 4, 8))


def test_placement_and_bundles():
    from orchestrator.sweep_runner import trial_resources

    one = TrialShape(1, 1.0, 8.0, 8)
    four = TrialShape(4, 1.0, 8.0, 8)
    two_nodes = TrialShape(16, 1.0, 8.0, 8)
    assert (four.placement, four.nodes) == (ONE_NODE, 1)
    assert (two_nodes.placement, two_nodes.nodes) == (FEWEST_NODES, 2)
    assert trial_resources(one).bundles == [{"CPU": 8.0, "GPU": 1.0}]
    # Tune reserves a wide trial's whole gang: its workers' bundles, with the shape's strategy.
    pgf = trial_resources(four)
    assert pgf.bundles == [{"CPU": 8.0, "GPU": 1.0}] * 4 and pgf.strategy == ONE_NODE
    assert trial_resources(two_nodes).strategy == FEWEST_NODES


def test_rank_environments_share_a_nodes_gpus():
    from orchestrator.worker_group import rank_envs

    places = [("n1", "10.0.0.1", ["3"]), ("n1", "10.0.0.1", ["5"]), ("n2", "10.0.0.2", ["0"]), ("n2", "10.0.0.2", ["1"])]
    envs = rank_envs(places, 29500)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"] and {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.1"} and {e["MASTER_PORT"] for e in envs} == {"29500"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3,5", "3,5", "0,1", "0,1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    cpu = rank_envs([("n1", "h", []), ("n1", "h", [])], 1)
    assert "CUDA_VISIBLE_DEVICES" not in cpu[1] and cpu[1]["LOCAL_RANK"] == "1"


def test_startup_and_efficiency_enter_the_hours():
    h = HARDWARE["h100"]
    assert h.startup.seconds(1) < h.startup.seconds(2) < h.startup.seconds(8)
    assert h.dp_efficiency(1, 8) == 1 and h.dp_efficiency(8, 8) == pytest.approx(0.97**3)
    assert h.dp_efficiency(16, 8) == pytest.approx(0.97**3 * 0.92)
    flops = 1e20
    assert h.hours(flops, 1, 8) == pytest.approx((h.startup.single + flops / h.effective_flops) / 3600)


def test_queue_is_longest_first():
    from orchestrator.sweep_runner import queue_order

    class T:
        def __init__(self, tid, hours, gpus):
            self.trial_id, self.est_hours, self.shape = tid, hours, TrialShape(gpus, 1.0, 1.0, 8)

    trials = [("a", T("x", 1.0, 1)), ("b", T("y", 5.0, 1)), ("a", T("z", 5.0, 8)), ("b", T("w", 0.1, 2))]
    queue, order = queue_order(trials)  # no cluster to plan on: longest first
    assert [t.trial_id for _, t in queue] == ["z", "y", "x", "w"] and order == "longest first"
    # On a cluster: the order the cluster model finishes sooner, named with its prediction.
    queue, order = queue_order(trials, cluster_gpus=16)
    assert sorted(t.trial_id for _, t in queue) == ["w", "x", "y", "z"] and queue[0][1].trial_id == "z"
    assert order.split(" (")[0] in ORDERS and "on 16 GPUs" in order


def _jobs(n: int, hours: tuple[float, float], widths: tuple[int, ...] = (1,)) -> list[Job]:
    import random

    rng = random.Random(0)
    return [Job(round(rng.uniform(*hours), 3), rng.choice(widths)) for _ in range(n)]


def test_queue_paces_short_trials_only_when_the_driver_would_set_the_tail():
    jobs = _jobs(200, (0.05, 2.0))
    assert longest_first(jobs, 8, 8, 0.0) == sorted(jobs, key=lambda j: -j.hours)  # real speed: longest first
    for gap in (0.01, 0.05):
        paced = longest_first(jobs, 8, 8, gap)
        assert sorted(paced, key=id) == sorted(jobs, key=id)  # the same trials, each once
    # One start per 0.05 h: longest first leaves ~100 short trials to a driver-bound tail.
    slow = 0.05
    assert simulate(longest_first(jobs, 8, 8, slow), 1, 8, start_gap=slow).makespan < \
        simulate(longest_first(jobs, 8, 8, 0.0), 1, 8, start_gap=slow).makespan - 0.2


def test_where_actors_cost_time_every_width_but_the_last_ends_spread_out():
    mixed = _jobs(60, (0.5, 3.0), (1, 2))
    real = widest_first(mixed, 8, 8)
    staggered = widest_first(mixed, 8, 8, 0.0, 0.05)
    for queue, two_gpu_order in ((real, -1), (staggered, 1)):
        two = [j.hours for j in queue if j.gpus == 2]
        one = [j.hours for j in queue if j.gpus == 1]
        assert [j.gpus for j in queue] == sorted((j.gpus for j in queue), reverse=True)
        assert two == sorted(two, reverse=two_gpu_order < 0)  # real speed: longest first
        assert one == sorted(one, reverse=True)  # the last width sets the tail: longest first
    # 16 one-GPU actors to start at the switch: spread out, they wait less on idle GPUs.
    plain = [*sorted((j for j in mixed if j.gpus == 2), key=lambda j: -j.hours),
             *sorted((j for j in mixed if j.gpus == 1), key=lambda j: -j.hours)]
    assert simulate(staggered, 2, 8, process_gap=0.05).makespan < simulate(plain, 2, 8, process_gap=0.05).makespan


def test_best_queue_is_the_order_the_model_finishes_first():
    mixed = _jobs(60, (0.5, 3.0), (1, 2))
    widths = [j.gpus for j in widest_first(mixed, 8, 8)]
    assert widths == sorted(widths, reverse=True)  # one shape after another: Tune reuses its actors
    chosen = set()
    for nodes in (1, 2, 4):
        name, queue, s = best_queue(mixed, nodes, 8)
        spans = {n: simulate(order(mixed, 8, nodes * 8, 0.0), nodes, 8).makespan for n, order in ORDERS.items()}
        assert s.makespan == pytest.approx(min(spans.values())) and spans[name] == pytest.approx(s.makespan)
        chosen.add(name)
    assert chosen == set(ORDERS)  # each order wins somewhere: neither is always better


def test_cluster_model_reuses_an_actor_only_for_a_waiting_trial_of_its_width():
    # One GPU, three trials one after another: one actor, its start (0.5 h) paid once.
    s = simulate([Job(1.0, 1)] * 3, nodes=1, gpus_per_node=1, process_gap=0.5)
    assert s.actors == 1 and s.makespan == pytest.approx(3.5)
    # 2 GPUs: the 2-GPU actor stays idle while the 1-GPU trial runs, because a 2-GPU trial waits;
    # the 1-GPU trial needs an actor of its own.
    s = simulate([Job(1.0, 2), Job(1.0, 1), Job(1.0, 2)], nodes=1, gpus_per_node=2, process_gap=0.5)
    assert s.actors == 2 and s.makespan == pytest.approx(4.0)
    # No 2-GPU trial in the look-ahead when the first ends: its actor is dropped, and the last
    # trial starts a new one (4 actors: 2 GPUs, 1, 1, 2; the third 1-GPU trial reuses one).
    s = simulate([Job(1.0, 2), Job(1.0, 1), Job(1.0, 1), Job(1.0, 1), Job(1.0, 2)], nodes=1, gpus_per_node=2,
                 window=1, process_gap=0.5)
    assert s.actors == 4
    # The driver's part does not wait for an actor: the third trial reuses the first's actor and
    # starts at once (the driver waiting on the second trial's actor would end it at 4).
    s = simulate([Job(1.0, 1)] * 3, nodes=1, gpus_per_node=2, start_gap=1.0, process_gap=1.0)
    assert s.actors == 2 and s.makespan == pytest.approx(3.0)
    # Without a start cost the schedule is the plain list schedule.
    assert simulate([Job(1.0, 1)] * 3, nodes=1, gpus_per_node=1).makespan == pytest.approx(3.0)


def test_cluster_model_gangs_and_groups():
    # Two nodes of 2: a 2-GPU gang cannot use one free GPU on each node.
    jobs = [Job(1.0, 1), Job(2.0, 1), Job(1.0, 2)]
    s = simulate(jobs, nodes=2, gpus_per_node=2)
    assert s.makespan == pytest.approx(2.0)  # the gang waits for node 0 at t = 1
    loose = simulate([Job(1.0, 1), Job(2.0, 1), Job(1.0, 2, gang=False)], nodes=2, gpus_per_node=2)
    assert loose.makespan == pytest.approx(2.0)
    # Groups run one after another (today's sweeps, one command each).
    seq = simulate([Job(1.0, 1, group=0), Job(1.0, 1, group=1)], nodes=1, gpus_per_node=2)
    assert seq.makespan == pytest.approx(2.0)
    # Longest first reaches the bound where first come first served does not.
    mixed = [Job(1.0, 1)] * 4 + [Job(4.0, 1)]
    assert simulate(mixed, 1, 2).makespan == pytest.approx(6.0)
    best = simulate(longest_first(mixed), 1, 2)
    assert best.makespan == pytest.approx(4.0) and best.ratio == pytest.approx(1.0)


def test_study_library_uses_fewer_gpu_hours_than_one_shape(tmp_path):
    """The goal: the per-trial shapes' planned GPU-hours (start-up included) are no higher than
    every trial on 4 GPUs gives, and one longest-first queue on 64 GPUs ends near the bound."""
    from bench.cluster_schedule import new_model, plans, today

    folder = str(ROOT / "sweeps" / "slicing_dicing")
    new = plans(folder)
    assert sum(len(p.trials) for p in new) == 2358
    old = today(folder, 8, 8)
    _, model = new_model(new, 8, 8)
    assert model.gpu_hours <= old.gpu_hours
    assert model.ratio < 1.01 < old.ratio
    assert {t.shape.workers for p in new for t in p.trials} >= {1, 2, 8}
    # The bench's resume after losing 2 of 8 nodes: without the actors' starts counted the model
    # chose longest first (widths mixed all through: 732 processes, 2.19x the bound, measured);
    # with them, widest first.
    jobs = [Job(t.est_hours, int(t.shape.gpus)) for p in new for t in p.trials]
    driver, process = start_gaps(0.00174)
    assert best_queue(jobs, 6, 8, driver)[0] == "longest first"
    name, _, s = best_queue(jobs, 6, 8, driver, process)
    assert name == "widest first" and s.actors < 100


def test_plan_shows_gpus_per_trial_and_the_queue_wall_time(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(scale="study-1b", sparsity=4, extra=""))
    assert main(["plan", str(path), "--json", "--gpus", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    trial = out["trials"][0]
    assert (trial["workers"], trial["gpus"], trial["placement"], trial["nodes"]) == (8, 8, ONE_NODE, 1)
    assert out["cluster"]["wall_hours"] == pytest.approx(trial["est_hours"])
    assert main(["plan", str(path), "--gpus", "16"]) == 0
    assert "on 16 GPUs (2 nodes of 8): 1 trial in about" in capsys.readouterr().out
    assert main(["plan", str(path), "--gpus", "4", "--gpus-per-node", "4"]) == 2
    assert "is planned on 8 GPUs" in capsys.readouterr().err
    assert main(["plan", str(path), "--gpus", "12"]) == 2
    assert "multiple of --gpus-per-node" in capsys.readouterr().err


def test_simulated_rows_never_mix_with_trained_ones(tmp_path, capsys):
    from analysis.tables import load_trials, query
    from orchestrator.results import SweepPaths, trial_row, write_row

    runs = tmp_path / "runs"
    for name, simulated in (("real", False), ("sim", True)):
        paths = SweepPaths(runs, name)
        paths.make()
        for i in range(3):
            base = {"trial_id": f"{name}{i}", "sweep": name, "simulated": simulated}
            write_row(paths.trials / f"{name}{i}.parquet", trial_row(base, "completed", {"val_loss": 3.0}))
    assert sorted(load_trials(runs)["trial_id"]) == ["real0", "real1", "real2"]
    assert sorted(load_trials(runs, simulated=True)["trial_id"]) == ["sim0", "sim1", "sim2"]
    assert query("select count(*) as n from trials", runs, "sim")["n"][0] == 0
    assert main(["report", "sim", "--runs-dir", str(runs), "--out", str(tmp_path / "r")]) == 2
    assert "only simulated trials" in capsys.readouterr().err
    assert main(["query", "select count(*) as n from trials", "--runs-dir", str(runs), "--simulated", "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "3"]


def test_status_over_a_folder_shows_each_sweep_and_the_whole(tmp_path, capsys):
    from orchestrator.results import SweepPaths, trial_row, write_row

    folder = tmp_path / "sweeps"
    folder.mkdir()
    runs = tmp_path / "runs"
    for name, states in (("one", ["completed", "running"]), ("two", ["completed"])):
        (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
            name: {name}
            base: {{scale: micro-xs, train: {{steps: 1}}}}
            """))
        paths = SweepPaths(runs, name)
        paths.make()
        for i, state in enumerate(states):
            write_row(paths.trials / f"t{i}.parquet", trial_row({"trial_id": f"t{i}", "sweep": name}, state))
    assert main(["status", str(folder), "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out
    assert "all 2 sweeps: 3 planned trials: completed 2, interrupted 1" in out


def test_a_bayes_sweep_in_a_queue_is_a_clear_error(tmp_path):
    from orchestrator.sweep_runner import load_sweeps

    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "a.yaml").write_text("name: a\nbase: {scale: micro-xs}\n")
    (folder / "b.yaml").write_text("name: b\nmethod: bayes\ntrials: 2\nbase: {scale: micro-xs}\n"
                                   "parameters: {train.lr: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}}\n")
    with pytest.raises(ConfigError, match="b.yaml:2.*runs alone"):
        load_sweeps([folder])
    (folder / "b.yaml").write_text("name: a\nbase: {scale: micro-xs}\n")
    with pytest.raises(ConfigError, match="duplicate sweep name 'a'"):
        load_sweeps([folder])


def test_queue_gate_keeps_wide_trials_first_and_one_shape_waiting_for_reuse():
    from ray.tune.search import Searcher

    from orchestrator.queue_search import QueueGate, QueueSearcher

    width = {"w1": 8.0, "w2": 8.0, **{f"n{i}": 1.0 for i in range(20)}}
    gate = QueueGate(width, capacity=16, lookahead=2)
    search = QueueSearcher(list(width), gate)
    assert [search.suggest(str(i)) for i in range(2)] == [{"trial": "w1"}, {"trial": "w2"}]
    assert search.suggest("x") is None  # two wide trials wait: no narrow one may pass them
    gate.started("w1")
    assert search.suggest("x") == {"trial": "n0"}  # under the look-ahead: backfill as before
    assert search.suggest("x") is None  # mixed shapes waiting, look-ahead full
    gate.started("w2")
    handed = [search.suggest("x") for _ in range(20)]
    # One shape waiting: up to as many as the cluster runs at once (16 one-GPU trials).
    assert sum(h is not None for h in handed) == 15 and len(gate.waiting) == 16
    for key in list(gate.waiting):
        gate.started(key)
    rest = [search.suggest("x") for _ in range(5)]
    assert rest[:4] == [{"trial": f"n{i}"} for i in range(16, 20)] and rest[4] == Searcher.FINISHED
    assert gate.most_waiting == 16

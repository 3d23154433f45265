"""The trainer: budget, schedule, resume, determinism, divergence, outputs, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from moe_core import ConfigError
from moe_core.train.callbacks import TrainCallback
from moe_core.train.checkpoint import CheckpointError
from moe_core.train.config import TrainConfig
from moe_core.train.loop import train_trial
from moe_core.train.schedule import lr_factor
from moe_core.trial import TrialConfig

ROOT = Path(__file__).resolve().parents[1]


def _trial(cache: Path, **train) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": 257, "d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "seq_len": 32,
                  "moe": {"layout": "layerwise", "experts": [{"num_experts": 4, "top_k": 2, "granularity": 0.5}],
                          "balance": {"bias_rate": 0.001}}},
        "train": {"steps": 6, "batch_tokens": 256, "micro_batch_size": 4, "eval_every": 3, "eval_tokens": 512,
                  "log_routing_every": 2, **train},
        "data": {"tokenizer": "bytes", "cache_dir": str(cache)},
    })


def _losses(out: Path) -> list[float]:
    return pq.read_table(out / "metrics.parquet").column("train_loss").to_pylist()


def test_budget_from_tokens_per_active_param(cache):
    trial = _trial(cache, steps=None)
    from moe_core.accounting import training_steps

    assert trial.total_steps == training_steps(trial.model, trial.train)  # the rule: tests/test_accounting.py
    assert _trial(cache, steps=None, tokens=2560).total_steps == 10
    assert trial.accumulation_steps == 2  # 256 tokens / (4 sequences * 32)


def test_batch_tokens_must_divide_into_micro_batches(cache):
    with pytest.raises(ConfigError, match=r"batch_tokens \(200\) must be a multiple"):
        _trial(cache, batch_tokens=200)
    with pytest.raises(ConfigError, match="give only one of steps, tokens"):
        TrainConfig(steps=3, tokens=100)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_then_end_at_their_floor(schedule):
    cfg = TrainConfig(schedule=schedule, warmup_fraction=0.1, min_lr_ratio=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(100)]
    assert factors[0] == 0.0 and factors[5] == pytest.approx(0.5) and factors[10] == pytest.approx(1.0)  # from lr 0
    assert factors[-1] == pytest.approx(1.0 if schedule == "constant" else 0.1)
    if schedule == "wsd":
        assert factors[79] == 1.0 and factors[80] < 1.0


def test_any_warm_up_fraction_warms_up_at_least_one_step():
    # 1% of 20 steps rounds to none: the trial still starts from lr 0 (as Megatron), not at the peak.
    short = [lr_factor(s, 20, TrainConfig(warmup_fraction=0.01)) for s in range(20)]
    assert short[0] == 0.0 and short[1] == pytest.approx(1.0)
    assert lr_factor(0, 20, TrainConfig(warmup_fraction=0.0)) == pytest.approx(1.0)  # asked for none


def test_same_seed_gives_the_same_losses_and_all_outputs(cache, tmp_path):
    a = train_trial(_trial(cache), tmp_path / "a")
    train_trial(_trial(cache), tmp_path / "b")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert a.status == "completed" and a.steps == 6 and a.tokens == 6 * 256
    for name in ("config.yaml", "metrics.parquet", "summary.json"):
        assert (tmp_path / "a" / name).exists()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(summary["val_loss_by_set"]) == {"bible_ot", "bible_nt"}
    assert summary["val_loss"] == pytest.approx(sum(summary["val_loss_by_set"].values()) / 2)
    table = pq.read_table(tmp_path / "a" / "metrics.parquet")
    assert {"aux", "z", "lr", "grad_norm", "tokens_per_second", "mfu", "val_loss", "routing/max_load"} <= set(table.column_names)
    assert TrialConfig.from_dict(yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())) == _trial(cache)


class _Crash(TrainCallback):
    def on_step(self, step, row, model):
        if step == 5:
            raise KeyboardInterrupt


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(cache, tmp_path):
    train_trial(_trial(cache, checkpoint_every=2), tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train_trial(_trial(cache, checkpoint_every=2), tmp_path / "cut", callbacks=[_Crash()])
    resumed = train_trial(_trial(cache, checkpoint_every=2), tmp_path / "cut")
    assert resumed.steps == 6
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "step00000006.pt", weights_only=False)["model"]
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "step00000006.pt", weights_only=False)["model"]
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # loss-free biases included


class _Poison(TrainCallback):
    def on_step(self, step, row, model):
        if step == 2:
            with torch.no_grad():
                model.embed.weight.fill_(float("nan"))


def test_nan_loss_stops_at_once_as_diverged(cache, tmp_path):
    summary = train_trial(_trial(cache), tmp_path, callbacks=[_Poison()])
    assert summary.status == "diverged" and summary.steps == 3
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


def test_a_foreign_checkpoint_is_an_error_and_a_damaged_one_is_set_aside(cache, tmp_path):
    train_trial(_trial(cache, steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="different config"):
        train_trial(_trial(cache, steps=3, lr=0.5), tmp_path)
    (tmp_path / "checkpoints" / "step00000002.pt").write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="damaged checkpoint .* kept as .*damaged"):
        again = train_trial(_trial(cache, steps=2), tmp_path)  # the only checkpoint: starts over
    assert again.status == "completed" and again.steps == 2
    assert [p.read_bytes() for p in (tmp_path / "checkpoints" / "damaged").iterdir()] == [b"not a checkpoint"]
    assert _losses(tmp_path) == _losses_of_fresh_run(cache, tmp_path / "fresh", steps=2)


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(cache, tmp_path):
    with pytest.raises(_Stop):
        train_trial(_trial(cache, steps=6, checkpoint_every=2), tmp_path, callbacks=[_StopAfter(5)])
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step00000004.pt"
    (checkpoints / "step00000004.pt").write_bytes((checkpoints / "step00000004.pt").read_bytes()[:100])  # cut short
    with pytest.warns(UserWarning, match="step00000004.pt: damaged checkpoint"):
        train_trial(_trial(cache, steps=6, checkpoint_every=2), tmp_path)  # resumes at step 2
    assert _losses(tmp_path) == _losses_of_fresh_run(cache, tmp_path / "fresh", steps=6, checkpoint_every=2)


class _Stop(Exception):
    pass


class _StopAfter(TrainCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step, row, model):
        if step == self.step:
            raise _Stop


def _losses_of_fresh_run(cache, out, **train) -> list[float]:
    train_trial(_trial(cache, **train), out)
    return _losses(out)


def test_model_vocab_smaller_than_tokenizer_is_a_config_error(cache, tmp_path):
    trial = _trial(cache)
    small = TrialConfig.from_dict({**trial.to_dict(), "model": {**trial.model.to_dict(), "vocab_size": 100}})
    with pytest.raises(ConfigError, match=r"model.vocab_size: vocab_size \(100\) is smaller"):
        train_trial(small, tmp_path)


def test_routing_probe_reports_deeper_layers(cache, tmp_path):
    summary = train_trial(_trial(cache, routing_probe=True), tmp_path)
    assert set(summary.routing_probe) == {"L1", "mean"}


def test_downstream_accuracy_at_evaluations_in_the_summary_and_the_probe(cache, tmp_path):
    task = tmp_path / "abc.jsonl"
    task.write_text('{"context": "ab", "choices": ["c", "x"], "label": 0}\n' * 3)
    trial = _trial(cache, steps=6, eval_every=2, downstream=("bible_next_verse", str(task)), downstream_every=2,
                   downstream_examples=12, routing_probe=True)
    summary = train_trial(trial, tmp_path / "run")
    acc = summary.downstream
    assert set(acc) == {"acc_bible_next_verse", "acc_norm_bible_next_verse", "acc_abc", "acc_norm_abc"}
    assert all(v in {i / 12 for i in range(13)} for k, v in acc.items() if "bible" in k)  # 12 examples
    assert acc["acc_abc"] in (0.0, 1.0)  # three copies of one example
    rows = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pylist()
    scored = [r["step"] for r in rows if r.get("acc/bible_next_verse") is not None]
    assert scored == [4, 6]  # every 2nd evaluation (steps 2, 4, 6) and the end
    assert rows[-1]["acc/bible_next_verse"] == acc["acc_bible_next_verse"]
    assert rows[-1]["acc_norm/abc"] == acc["acc_norm_abc"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["downstream"] == acc
    assert set(summary.routing_probe) == {"L1", "mean", "acc_drop/L1", "acc_drop/mean"}  # the first task's


def test_a_missing_task_file_fails_before_any_step(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown task '.*nope.jsonl': give a built-in task \(bible_next_verse\)"):
        train_trial(_trial(cache, downstream=(str(tmp_path / "nope.jsonl"),)), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.parquet").exists()
    with pytest.raises(ConfigError, match="train.downstream: unknown task 'boolq'; allowed: bible_next_verse or a .jsonl file"):
        _trial(cache, downstream=("boolq",))
    for folder in ("a", "b"):  # two files whose columns would collide (acc_x): one would be lost
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.jsonl").write_text('{"context": "a", "choices": ["b"], "label": 0}\n')
    with pytest.raises(ConfigError, match=r"train.downstream: two tasks would share the columns acc_x"):
        train_trial(_trial(cache, downstream=(str(tmp_path / "a/x.jsonl"), str(tmp_path / "b/x.jsonl"))), tmp_path / "run")


def test_moe_sweep_train_writes_the_three_outputs(cache, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_trial(cache, steps=2).to_dict()))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "completed: 2 steps" in proc.stdout
    for name in ("config.yaml", "metrics.parquet", "summary.json", "checkpoints/latest"):
        assert (tmp_path / "out" / name).exists()
    config.write_text("model: {vocab_size: 10}\ntrain: {stepz: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "train.stepz: unknown key; did you mean 'steps'?" in proc.stderr


def _worker(rank: int, world: int, init: str, cache: str, out: str, scope: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        trial = _trial(Path(cache))
        trial = TrialConfig.from_dict({**trial.to_dict(), "model": {**trial.model.to_dict(), "moe": {
            **trial.model.moe.to_dict(), "balance": {"aux_scope": scope, "bias_rate": 0.01}}}})
        train_trial(trial, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["micro_batch", "global_batch"])
def test_two_gloo_workers_match_one_worker(cache, tmp_path, scope):
    """Same global batch, gradients averaged by DDP, load counts summed over workers."""
    import torch.multiprocessing as tmp_mp

    for world, name in ((2, "two"), (1, "one")):
        init = f"file://{tmp_path / ('pg' + name)}"
        tmp_mp.spawn(_worker, args=(world, init, str(cache), str(tmp_path / name), scope), nprocs=world)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, rel=1e-4)
    if scope == "global_batch":
        # "So far this step" covers W micro-batches per micro-step with W workers, one with one
        # worker: the aux loss differs slightly by design, so routing may too.
        return
    bias_two = torch.load(tmp_path / "two" / "checkpoints" / "step00000006.pt", weights_only=False)["model"]
    bias_one = torch.load(tmp_path / "one" / "checkpoints" / "step00000006.pt", weights_only=False)["model"]
    assert torch.equal(bias_two["blocks.0.ffn.bias_N"], bias_one["blocks.0.ffn.bias_N"])

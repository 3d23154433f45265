"""Train one trial: the loop every sweep trial runs, also runnable alone (`moe-sweep train`).

Writes to the output folder: `config.yaml` (the fully resolved trial), `metrics.parquet` (a row per
step, evaluations as columns), `summary.json` and `checkpoints/`. Re-running on the same folder
resumes from the latest checkpoint and reproduces, bit for bit on CPU, the uninterrupted run.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_core.accounting import ParamCount, count_params
from moe_core.data.tokens import TokenData, prepare_tokens
from moe_core.errors import ConfigError
from moe_core.eval.multiple_choice import MCResult
from moe_core.files import write_json, write_parquet, write_text
from moe_core.model import MoETransformer, build_model
from moe_core.train.batches import micro_batches
from moe_core.train.callbacks import TrainCallback
from moe_core.train.checkpoint import load_latest, restore, save_checkpoint, save_sharded_checkpoint
from moe_core.train.distributed import DataParallel
from moe_core.train.evaluation import Tasks, accuracy_columns, autocast, evaluate, macro, routing_probe
from moe_core.train.fsdp import plain, shard_model
from moe_core.train.metrics import peak_flops, routing_columns
from moe_core.train.schedule import lr_factor
from moe_core.trial import TrialConfig


@dataclass
class TrainSummary:
    status: str  # "completed" or "diverged"
    steps: int
    tokens: int
    train_loss: float
    val_loss: float  # the macro-average over the validation sets, as in every row and table
    val_loss_by_set: dict[str, float]
    perplexity: float
    params: dict[str, int]
    flops_per_token: int
    train_flops: float
    wall_seconds: float
    tokens_per_second: float
    downstream: dict[str, float] = field(default_factory=dict)  # acc_<task>, acc_norm_<task>
    routing_probe: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_device(choice: str) -> torch.device:
    """`train.device` as a torch device (`auto`: CUDA when there is one)."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(model: torch.nn.Module, trial: TrialConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norm gains and scalars do not. The fused kernel on CUDA and on CPU
    (one pass per parameter; on 2 CPU cores it stepped the 15.5M-parameter MoE of
    bench/train_throughput.py in 11 ms against the foreach path's 37)."""
    t = trial.train
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type in ("cuda", "cpu"))


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the GPU from pinned memory without blocking: a pageable copy would wait for the GPU
    to finish the previous micro-batch first."""
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def train_trial(
    trial: TrialConfig, out_dir: str | Path, callbacks: list[TrainCallback] | tuple = (), data: TokenData | None = None
) -> TrainSummary:
    run = _set_up(trial, Path(out_dir), list(callbacks), data)
    status = "completed"
    run.model.train()
    for step in range(run.start_step, trial.total_steps):
        row = _step(run, step)
        if row is None:
            status = "diverged"
            break
        last = step + 1 == trial.total_steps
        if (step + 1) % trial.train.eval_every == 0 or last:
            _evaluate_into(run, row, step + 1, last)
        run.rows.append(row)
        for cb in run.callbacks:
            cb.on_step(step + 1, row, run.model)
        every = trial.train.checkpoint_every
        if last or (every and (step + 1) % every == 0):
            _checkpoint(run, step + 1)
    return _finish(run, status)


@dataclass
class _Run:
    """Everything one trial's training holds, built by `_set_up`."""

    trial: TrialConfig
    out: Path
    callbacks: list[TrainCallback]
    dp: DataParallel
    device: torch.device
    data: TokenData
    tasks: Tasks
    model: MoETransformer
    wrapped: torch.nn.Module  # what the step calls backward through: the model, or its DDP wrapper
    step_fn: torch.nn.Module  # `wrapped`, compiled when train.compile
    optimizer: torch.optim.Optimizer
    sharded: bool  # FSDP: also picks the checkpoint layout, at any worker count
    counts: ParamCount
    peak: float  # FLOP/s, for MFU
    rows: list[dict[str, Any]] = field(default_factory=list)
    start_step: int = 0
    wall_before: float = 0.0  # seconds trained before a resume
    t_start: float = 0.0
    val: dict[str, float] = field(default_factory=dict)  # the latest validation losses
    scores: dict[str, MCResult] = field(default_factory=dict)  # the latest downstream results, by task

    @property
    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start


def _set_up(trial: TrialConfig, out: Path, callbacks: list[TrainCallback], data: TokenData | None) -> _Run:
    """Data, model, optimizer and workers; resumed from the latest checkpoint in `out` if any."""
    dp = DataParallel.current()
    if trial.accumulation_steps % dp.world_size:
        raise ConfigError(
            f"accumulation steps ({trial.accumulation_steps}) must be divisible by the {dp.world_size} workers",
            path="train.batch_tokens",
        )
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(trial.to_dict(), sort_keys=False))
    device = train_device(trial.train.device)
    if device.type == "cuda" and dp.enabled:
        device = torch.device("cuda", torch.cuda.current_device())
    data = data or prepare_tokens(trial.data, lambda n: [cb.on_tokenising(trial.data.source, n) for cb in callbacks])
    if trial.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"vocab_size ({trial.model.vocab_size}) is smaller than the tokenizer's vocabulary ({data.vocab_size})",
            path="model.vocab_size",
        )
    tasks = Tasks.of(trial)  # before any compute: a missing task file fails fast
    torch.manual_seed(trial.seed)  # the same initial model on every worker
    model = build_model(trial.model).to(device)
    model.set_activation_checkpointing(trial.train.activation_checkpointing)
    if dp.enabled:
        model.set_count_reducer(dp.sum_)
    sharded = trial.train.sharding == "fsdp"
    if sharded and dp.enabled:
        shard_model(model, device, dp)
        wrapped = model
    else:
        wrapped = dp.wrap(model, device)
    optimizer = _optimizer(model, trial, device)  # after sharding: its parameters are the shards
    run = _Run(
        trial=trial, out=out, callbacks=callbacks, dp=dp, device=device, data=data, tasks=tasks, model=model,
        wrapped=wrapped, step_fn=torch.compile(wrapped) if trial.train.compile else wrapped, optimizer=optimizer,
        sharded=sharded, counts=count_params(trial.model), peak=peak_flops(device, trial.train.peak_flops),
    )
    state = load_latest(out / "checkpoints", trial.to_dict(), keep_aside=dp.is_main)
    if state is not None:
        restore(state, model, optimizer)
        torch.set_rng_state(state["rng"])
        run.rows, run.start_step, run.wall_before = state["rows"], state["step"], state["wall_seconds"]
    run.t_start = time.perf_counter()
    return run


def _step(run: _Run, step: int) -> dict[str, Any] | None:
    """One optimizer step over its micro-batches; its metrics row, or None if the loss diverged
    (the diverged row is recorded, the step not taken)."""
    trial, dp, device, model = run.trial, run.dp, run.device, run.model
    t0 = time.perf_counter()
    tokens_per_step = trial.train.batch_tokens
    accum = trial.accumulation_steps // dp.world_size
    lr = trial.train.lr * lr_factor(step, trial.total_steps, trial.train)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    sums: dict[str, torch.Tensor] = {}  # kept on the device: one sync per step, not per micro-batch
    batches = micro_batches(run.data.train, trial.model.seq_len, trial.train.micro_batch_size, accum, trial.seed,
                            step, dp.rank, dp.world_size)
    for i, (x, y) in enumerate(batches):
        # DDP averages gradients once per optimizer step, on the last micro-batch (FSDP
        # reduce-scatters them after every micro-batch: it keeps no unsharded gradients).
        sync = nullcontext() if run.wrapped is model or i == accum - 1 else run.wrapped.no_sync()
        with sync, autocast(device):
            result = run.step_fn(_to_device(x, device), _to_device(y, device))
            (result.loss / accum).backward()
        for name, value in {"train_loss": result.ce, **result.balance}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / accum
    clip = trial.train.grad_clip or float("inf")
    norm = plain(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # no step yet: see below
    # The step's one read of device values: the losses and the gradient norm together.
    *values, grad_norm = torch.stack([*sums.values(), norm.float().to(device)]).tolist()
    means = dp.mean(dict(zip(sums, values)))
    if not all(math.isfinite(v) for v in means.values()):
        run.rows.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, **means, "lr": lr})
        return None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    model.finish_step(dp.sum_ if dp.enabled else None)
    seconds = time.perf_counter() - t0
    row = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, **means, "lr": lr, "grad_norm": grad_norm,
           "tokens_per_second": tokens_per_step / seconds,
           "mfu": run.counts.flops_per_token * tokens_per_step / seconds / run.peak}
    every = trial.train.log_routing_every
    if every and (step + 1) % every == 0:
        row.update(routing_columns(model.routing_stats()))
    return row


def _evaluate_into(run: _Run, row: dict[str, Any], step: int, last: bool) -> None:
    """Validation losses into `row` (and the callbacks); downstream accuracies (as `acc/<task>`)
    at the end, and every `downstream_every` evaluations."""
    run.val = evaluate(run.model, run.data, run.trial, run.device)
    row.update({f"val_loss/{k}": v for k, v in run.val.items()})
    row["val_loss"] = macro(run.val)
    every = run.trial.train.downstream_every
    if run.tasks.examples and (last or (every and (step // run.trial.train.eval_every) % every == 0)):
        run.scores = run.tasks.score(run.model, run.data.tokenizer, run.trial, run.device)
        row.update(accuracy_columns(run.scores, "/"))
    for cb in run.callbacks:
        cb.on_eval(step, {"val_loss": row["val_loss"], **{f"val_loss/{k}": v for k, v in run.val.items()}})


def _checkpoint(run: _Run, step: int) -> None:
    trainer = {"config": run.trial.to_dict(), "rng": torch.get_rng_state(), "rows": run.rows, "wall_seconds": run.wall}
    if run.sharded:
        path = save_sharded_checkpoint(run.out / "checkpoints", step, trainer, run.model, run.optimizer, run.dp)
    elif run.dp.is_main:
        path = save_checkpoint(run.out / "checkpoints", step, {
            **trainer, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()})
    if run.dp.is_main:
        write_parquet(run.out / "metrics.parquet", run.rows)
        for cb in run.callbacks:
            cb.on_checkpoint(step, path)


def _finish(run: _Run, status: str) -> TrainSummary:
    """The summary (also `summary.json`): losses, downstream accuracies, the routing probe."""
    trial, rows = run.trial, run.rows
    wall = run.wall
    if run.dp.is_main:
        write_parquet(run.out / "metrics.parquet", rows)
    completed = status == "completed"
    if completed and not run.val:  # resumed after the final step: evaluate once more
        run.val = evaluate(run.model, run.data, trial, run.device)
    if completed and run.tasks.examples and not run.scores:
        run.scores = run.tasks.score(run.model, run.data.tokenizer, trial, run.device)
    steps_done = rows[-1]["step"] if rows else 0
    tokens_per_step = trial.train.batch_tokens
    loss = macro(run.val) if run.val else float("nan")
    train_rows = [r["train_loss"] for r in rows[-10:]]
    probe = (routing_probe(run.model, run.data, trial, run.device, run.tasks, loss, run.scores)
             if trial.train.routing_probe and completed else {})
    summary = TrainSummary(
        status=status,
        steps=steps_done,
        tokens=steps_done * tokens_per_step,
        train_loss=sum(train_rows) / len(train_rows) if train_rows else float("nan"),
        val_loss=loss,
        val_loss_by_set=run.val,
        perplexity=math.exp(loss) if math.isfinite(loss) else float("nan"),
        params=run.counts.to_dict(),
        flops_per_token=run.counts.flops_per_token,
        train_flops=float(run.counts.flops_per_token) * steps_done * tokens_per_step,
        wall_seconds=wall,
        tokens_per_second=steps_done * tokens_per_step / wall if wall > 0 else 0.0,
        downstream=accuracy_columns(run.scores),
        routing_probe=probe,
    )
    if run.dp.is_main:
        write_json(run.out / "summary.json", summary.to_dict(), indent=1)
    return summary

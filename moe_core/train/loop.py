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

from moe_core.accounting import count_params
from moe_core.data.tokens import TokenData, prepare_tokens
from moe_core.errors import ConfigError
from moe_core.files import write_json, write_parquet, write_text
from moe_core.model import MoETransformer, build_model
from moe_core.train.batches import eval_batches, micro_batches
from moe_core.train.callbacks import TrainCallback
from moe_core.train.checkpoint import load_latest, restore, save_checkpoint, save_sharded_checkpoint
from moe_core.train.distributed import DataParallel
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
    val_loss: dict[str, float]
    val_loss_macro: float
    perplexity: float
    params: dict[str, int]
    flops_per_token: int
    train_flops: float
    wall_seconds: float
    tokens_per_second: float
    routing_probe: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _optimizer(model: torch.nn.Module, trial: TrialConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norm gains and scalars do not."""
    t = trial.train
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda")


def evaluate(model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over each validation set's fixed windows, and their macro-average."""
    was_training = model.training
    model.eval()
    losses = {}
    with torch.no_grad(), _autocast(device):
        for name, tokens in data.val.items():
            total, count = 0.0, 0
            for x, y in eval_batches(tokens, trial.model.seq_len, trial.train.eval_tokens, trial.train.micro_batch_size):
                out = model(x.to(device), y.to(device))
                total += float(out.ce) * y.numel()
                count += y.numel()
            losses[name] = total / count
    model.train(was_training)
    return losses


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the GPU from pinned memory without blocking: a pageable copy would wait for the GPU
    to finish the previous micro-batch first."""
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def routing_probe(model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device) -> dict[str, float]:
    """Loss increase when one deeper-half MoE layer routes uniformly at random, layer by layer."""
    layers = [f.layer for f in model.moe_layers]
    if not layers:
        return {}
    base = _macro(evaluate(model, data, trial, device))
    out = {}
    for layer in layers[len(layers) // 2 :]:
        model.set_routing_probe([layer], candidates="pool", seed=trial.seed)
        out[f"L{layer}"] = _macro(evaluate(model, data, trial, device)) - base
    model.set_routing_probe(None)
    out["mean"] = sum(out.values()) / len(out)
    return out


def _macro(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def train_trial(
    trial: TrialConfig, out_dir: str | Path, callbacks: list[TrainCallback] | tuple = (), data: TokenData | None = None
) -> TrainSummary:
    out = Path(out_dir)
    dp = DataParallel.current()
    if trial.accumulation_steps % dp.world_size:
        raise ConfigError(
            f"accumulation steps ({trial.accumulation_steps}) must be divisible by the {dp.world_size} workers",
            path="train.batch_tokens",
        )
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", yaml.safe_dump(trial.to_dict(), sort_keys=False))
    device = _device(trial.train.device)
    if device.type == "cuda" and dp.enabled:
        device = torch.device("cuda", torch.cuda.current_device())
    data = data or prepare_tokens(trial.data, lambda n: [cb.on_tokenising(trial.data.source, n) for cb in callbacks])
    if trial.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"vocab_size ({trial.model.vocab_size}) is smaller than the tokenizer's vocabulary ({data.vocab_size})",
            path="model.vocab_size",
        )
    torch.manual_seed(trial.seed)  # the same initial model on every worker
    model = build_model(trial.model).to(device)
    model.set_activation_checkpointing(trial.train.activation_checkpointing)
    if dp.enabled:
        model.set_count_reducer(dp.sum_)
    sharded = trial.train.sharding == "fsdp"  # also picks the checkpoint layout, at any worker count
    if sharded and dp.enabled:
        shard_model(model, device, dp)
        wrapped = model
    else:
        wrapped = dp.wrap(model, device)
    optimizer = _optimizer(model, trial, device)  # after sharding: its parameters are the shards
    step_fn = torch.compile(wrapped) if trial.train.compile else wrapped
    counts = count_params(trial.model)
    total_steps, accum = trial.total_steps, trial.accumulation_steps // dp.world_size
    tokens_per_step = trial.train.batch_tokens
    peak = peak_flops(device, trial.train.peak_flops)

    rows: list[dict[str, Any]] = []
    start_step, wall_before = 0, 0.0
    state = load_latest(out / "checkpoints", trial.to_dict())
    if state is not None:
        restore(state, model, optimizer)
        torch.set_rng_state(state["rng"])
        rows, start_step, wall_before = state["rows"], state["step"], state["wall_seconds"]

    status, val = "completed", {}
    t_start = time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        lr = trial.train.lr * lr_factor(step, total_steps, trial.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums: dict[str, torch.Tensor] = {}  # kept on the device: one sync per step, not per micro-batch
        batches = micro_batches(data.train, trial.model.seq_len, trial.train.micro_batch_size, accum, trial.seed,
                                step, dp.rank, dp.world_size)
        for i, (x, y) in enumerate(batches):
            # DDP averages gradients once per optimizer step, on the last micro-batch (FSDP
            # reduce-scatters them after every micro-batch: it keeps no unsharded gradients).
            sync = nullcontext() if wrapped is model or i == accum - 1 else wrapped.no_sync()
            with sync, _autocast(device):
                result = step_fn(_to_device(x, device), _to_device(y, device))
                (result.loss / accum).backward()
            for name, value in {"train_loss": result.ce, **result.balance}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / accum
        clip = trial.train.grad_clip or float("inf")
        norm = plain(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # no step yet: see below
        # The step's one read of device values: the losses and the gradient norm together.
        *values, grad_norm = torch.stack([*sums.values(), norm.float().to(device)]).tolist()
        sums = dp.mean(dict(zip(sums, values)))
        if not all(math.isfinite(v) for v in sums.values()):
            status = "diverged"
            rows.append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, **sums, "lr": lr})
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.finish_step(dp.sum_ if dp.enabled else None)
        seconds = time.perf_counter() - t0
        row = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, **sums, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_second": tokens_per_step / seconds,
               "mfu": counts.flops_per_token * tokens_per_step / seconds / peak}
        every = trial.train.log_routing_every
        if every and (step + 1) % every == 0:
            row.update(routing_columns(model.routing_stats()))
        last = step + 1 == total_steps
        if (step + 1) % trial.train.eval_every == 0 or last:
            val = evaluate(model, data, trial, device)
            row.update({f"val_loss/{k}": v for k, v in val.items()})
            row["val_loss"] = _macro(val)
            for cb in callbacks:
                cb.on_eval(step + 1, {"val_loss": row["val_loss"], **{f"val_loss/{k}": v for k, v in val.items()}})
        rows.append(row)
        for cb in callbacks:
            cb.on_step(step + 1, row, model)
        every = trial.train.checkpoint_every
        if last or (every and (step + 1) % every == 0):
            wall = wall_before + time.perf_counter() - t_start
            trainer = {"config": trial.to_dict(), "rng": torch.get_rng_state(), "rows": rows, "wall_seconds": wall}
            if sharded:
                path = save_sharded_checkpoint(out / "checkpoints", step + 1, trainer, model, optimizer, dp)
            elif dp.is_main:
                path = save_checkpoint(out / "checkpoints", step + 1, {
                    **trainer, "model": model.state_dict(), "optimizer": optimizer.state_dict()})
            if dp.is_main:
                write_parquet(out / "metrics.parquet", rows)
                for cb in callbacks:
                    cb.on_checkpoint(step + 1, path)

    wall = wall_before + time.perf_counter() - t_start
    if dp.is_main:
        write_parquet(out / "metrics.parquet", rows)
    steps_done = rows[-1]["step"] if rows else 0
    if status == "completed" and not val:  # resumed after the final step: evaluate once more
        val = evaluate(model, data, trial, device)
    macro = _macro(val) if val else float("nan")
    train_rows = [r["train_loss"] for r in rows[-10:]]
    summary = TrainSummary(
        status=status,
        steps=steps_done,
        tokens=steps_done * tokens_per_step,
        train_loss=sum(train_rows) / len(train_rows) if train_rows else float("nan"),
        val_loss=val,
        val_loss_macro=macro,
        perplexity=math.exp(macro) if math.isfinite(macro) else float("nan"),
        params=counts.to_dict(),
        flops_per_token=counts.flops_per_token,
        train_flops=float(counts.flops_per_token) * steps_done * tokens_per_step,
        wall_seconds=wall,
        tokens_per_second=steps_done * tokens_per_step / wall if wall > 0 else 0.0,
        routing_probe=routing_probe(model, data, trial, device) if trial.train.routing_probe and status == "completed" else {},
    )
    if dp.is_main:
        write_json(out / "summary.json", summary.to_dict(), indent=1)
    return summary

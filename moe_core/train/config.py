"""How one trial trains: budget, batch, optimiser, schedule, evaluation and checkpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from moe_core.config import StrictConfig

PosInt = Annotated[int, Field(ge=1)]
BudgetParams = Literal["active", "active_non_embedding"]


class TrainConfig(StrictConfig):
    # Budget: exactly one of steps / tokens / tokens_per_active_param (the default, 20 as in
    # compute-optimal training) fixes the number of optimizer steps.
    steps: PosInt | None = None
    tokens: PosInt | None = None
    tokens_per_active_param: Annotated[float, Field(gt=0)] | None = None
    # Which count that budget multiplies (moe_core.accounting): `active` includes the embedding and
    # head, as the compute-optimal 20 tokens/parameter rule counts them; `active_non_embedding`
    # leaves them out, which matters at the smallest scales where they are most of the model.
    # Routers are never in it, so every FLOP-matched trial of a scale gets the same budget.
    budget_params: BudgetParams = "active"
    batch_tokens: PosInt = 16384  # tokens per optimizer step (all workers, all micro-batches)
    micro_batch_size: PosInt = 8  # sequences per forward pass per worker
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-3  # AdamW: above 1 is a typo
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.01
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # WSD: final share of steps that decays
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.1  # decoupled: multiplied by lr
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.95
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # 0 disables clipping
    eval_every: PosInt = 100  # steps; also evaluated at the end
    eval_tokens: PosInt = 32768  # per validation set, at most
    checkpoint_every: Annotated[int, Field(ge=0)] = 0  # steps; 0 = only at the end
    log_routing_every: Annotated[int, Field(ge=0)] = 10  # steps between routing statistics; 0 = never
    routing_probe: bool = False  # at the end, route each deeper-half MoE layer at random in turn
    # Multiple-choice tasks scored at the end (moe_core.eval): built-in names (`bible_next_verse`)
    # or JSONL files. `downstream_every` also scores them every N evaluations (0: at the end only);
    # `downstream_examples` caps each task (None: a built-in task's default, or the whole file).
    # Every trial scores the same examples (fixed task seed), so accuracies compare across trials.
    downstream: tuple[str, ...] = ()
    downstream_every: Annotated[int, Field(ge=0)] = 0
    downstream_examples: PosInt | None = None
    # With several workers: `none` replicates the model (DDP); `fsdp` shards parameters, gradients
    # and optimizer states over them (FSDP2) and checkpoints with torch.distributed.checkpoint.
    sharding: Literal["none", "fsdp"] = "none"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    peak_flops: Annotated[float, Field(gt=0)] | None = None  # for MFU; None = known GPU table / measured CPU

    @field_validator("downstream")
    @classmethod
    def _tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        from moe_core.eval.tasks import BUILTIN_TASKS  # the files themselves are read when a trial starts

        for task in tasks:
            if task not in BUILTIN_TASKS and not task.endswith(".jsonl"):
                raise ValueError(f"unknown task {task!r}; allowed: {', '.join(BUILTIN_TASKS)} or a .jsonl file")
        return tasks

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        given = [k for k in ("steps", "tokens", "tokens_per_active_param") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of steps, tokens, tokens_per_active_param (got {', '.join(given)})")
        if self.downstream_every and not self.downstream:
            raise ValueError("downstream_every needs tasks in downstream")
        return self

"""What a trial measures besides its training loss: validation losses, downstream accuracy on
multiple-choice tasks, and the routing probe (one deeper layer routed at random at a time).

All of it runs in eval mode without autograd, which leaves the MoE layers' counters, loss-free
biases and pool loads as training left them (`moe.layer.updates_state`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moe_core.data.tokens import TokenData
from moe_core.eval.examples import MCExample
from moe_core.eval.multiple_choice import score_choices
from moe_core.eval.tasks import column_name, resolve_task
from moe_core.model import MoETransformer
from moe_core.train.batches import eval_batches
from moe_core.trial import TrialConfig

TASK_SEED = 0  # every trial scores the same examples of a built-in task, so trials compare


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training); full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def evaluate(model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over each validation set's fixed windows."""
    was_training = model.training
    model.eval()
    losses = {}
    with torch.no_grad(), autocast(device):
        for name, tokens in data.val.items():
            total, count = 0.0, 0
            for x, y in eval_batches(tokens, trial.model.seq_len, trial.train.eval_tokens, trial.train.micro_batch_size):
                out = model(x.to(device), y.to(device))
                total += float(out.ce) * y.numel()
                count += y.numel()
            losses[name] = total / count
    model.train(was_training)
    return losses


def macro(losses: dict[str, float]) -> float:
    """The study's validation loss: the mean over held-out sets."""
    return sum(losses.values()) / len(losses)


@dataclass(frozen=True)
class Tasks:
    """A trial's downstream tasks, resolved (files read, built-in examples drawn) once."""

    examples: dict[str, list[MCExample]]  # task name -> examples

    @classmethod
    def of(cls, trial: TrialConfig) -> "Tasks":
        n = trial.train.downstream_examples
        return cls(dict(resolve_task(t, seed=TASK_SEED, n=n) for t in trial.train.downstream))

    def score(self, model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device) -> dict[str, float]:
        """`acc_<task>` and `acc_norm_<task>` of every task (empty without tasks)."""
        out = {}
        for name, examples in self.examples.items():
            with autocast(device):
                r = score_choices(model, data.tokenizer, examples, batch_size=4 * trial.train.micro_batch_size,
                                  device=device)
            out[f"acc_{column_name(name)}"] = r.acc
            out[f"acc_norm_{column_name(name)}"] = r.acc_norm
        return out


def step_columns(accuracy: dict[str, float]) -> dict[str, float]:
    """`acc_<task>` / `acc_norm_<task>` as steps-table columns `acc/<task>` / `acc_norm/<task>`
    (like `val_loss/<set>`: per-task detail of an evaluation step)."""
    out = {}
    for key, value in accuracy.items():
        measure = "acc_norm" if key.startswith("acc_norm_") else "acc"
        out[f"{measure}/{key.removeprefix(measure + '_')}"] = value
    return out


def routing_probe(
    model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device, tasks: Tasks
) -> dict[str, float]:
    """Loss increase (`L<i>`, `mean`) when one deeper-half MoE layer routes uniformly at random,
    layer by layer; with downstream tasks, also the first task's accuracy drop (`acc_drop/L<i>`,
    `acc_drop/mean`), the measure UniPool's paper reports."""
    layers = [f.layer for f in model.moe_layers]
    if not layers:
        return {}
    first = next(iter(tasks.examples), None)
    key = f"acc_{column_name(first)}" if first else None
    one = Tasks({first: tasks.examples[first]}) if first else None

    def measure() -> tuple[float, float | None]:
        loss = macro(evaluate(model, data, trial, device))
        return loss, one.score(model, data, trial, device)[key] if one else None

    base_loss, base_acc = measure()
    out: dict[str, float] = {}
    for layer in layers[len(layers) // 2 :]:
        model.set_routing_probe([layer], candidates="pool", seed=trial.seed)
        loss, acc = measure()
        out[f"L{layer}"] = loss - base_loss
        if acc is not None:
            out[f"acc_drop/L{layer}"] = base_acc - acc
    model.set_routing_probe(None)
    probed = [k for k in out if k.startswith("L")]
    out["mean"] = sum(out[k] for k in probed) / len(probed)
    if base_acc is not None:
        out["acc_drop/mean"] = sum(out[f"acc_drop/{k}"] for k in probed) / len(probed)
    return out

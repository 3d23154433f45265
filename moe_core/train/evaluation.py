"""What a trial measures besides its training loss: validation losses, downstream accuracy on
multiple-choice tasks, and the routing probe (one deeper layer routed at random at a time).

All of it runs in eval mode without autograd, which leaves the MoE layers' counters, loss-free
biases and pool loads as training left them (`moe.router.updates_state`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from moe_core.data.tokenizers import Tokenizer
from moe_core.data.tokens import TokenData
from moe_core.errors import ConfigError
from moe_core.eval.examples import MCExample
from moe_core.eval.multiple_choice import MCResult, score_choices
from moe_core.eval.tasks import column_name, resolve_task
from moe_core.model import MoETransformer
from moe_core.train.batches import eval_batches
from moe_core.trial import TrialConfig

TASK_SEED = 0  # every trial scores the same examples of a built-in task, so trials compare


def autocast(device: torch.device):
    """bf16 autocast on CUDA (as in training); full precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def inference(model: MoETransformer) -> Iterator[None]:
    """Eval mode without autograd (what keeps the MoE layers' state untouched), and the model's
    training mode restored afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device) -> dict[str, float]:
    """Mean next-token loss over each validation set's fixed windows."""
    losses = {}
    with inference(model), autocast(device):
        for name, tokens in data.val.items():
            total, count = 0.0, 0
            for x, y in eval_batches(tokens, trial.model.seq_len, trial.train.eval_tokens, trial.train.micro_batch_size):
                out = model(x.to(device), y.to(device))
                total += float(out.ce) * y.numel()
                count += y.numel()
            losses[name] = total / count
    return losses


def macro(losses: dict[str, float]) -> float:
    """The study's validation loss: the mean over held-out sets."""
    return sum(losses.values()) / len(losses)


@dataclass(frozen=True)
class Tasks:
    """A trial's downstream tasks, resolved (files read, built-in examples drawn) once, keyed by
    the name their columns carry (`column_name`)."""

    examples: dict[str, list[MCExample]]

    @classmethod
    def of(cls, trial: TrialConfig) -> "Tasks":
        return cls.resolve(trial.train.downstream, trial.train.downstream_examples)

    @classmethod
    def resolve(cls, tasks: Iterable[str], n: int | None = None) -> "Tasks":
        """Built-in names or JSONL files, at most `n` examples each."""
        examples: dict[str, list[MCExample]] = {}
        for task in tasks:
            name, items = resolve_task(task, seed=TASK_SEED, n=n)
            if column_name(name) in examples:
                raise ConfigError(f"two tasks would share the columns acc_{column_name(name)} ({task!r} and an "
                                  "earlier one): rename a file", path="train.downstream")
            examples[column_name(name)] = items
        return cls(examples)

    def score(self, model: MoETransformer, tokenizer: Tokenizer, trial: TrialConfig, device: torch.device,
              batch_size: int | None = None) -> dict[str, MCResult]:
        """Every task's result, scored as the trainer scores it (autocast on CUDA); the trainer,
        `moe-sweep eval` and the routing probe all come through here."""
        out = {}
        for name, examples in self.examples.items():
            with autocast(device):
                out[name] = score_choices(model, tokenizer, examples, device=device,
                                          batch_size=batch_size or 4 * trial.train.micro_batch_size)
        return out


def accuracy_columns(scores: dict[str, MCResult], sep: str = "_") -> dict[str, float]:
    """`acc_<task>`, `acc_norm_<task>` (summary and trials table; `sep="/"` for the steps table,
    like `val_loss/<set>`)."""
    out = {}
    for name, r in scores.items():
        out[f"acc{sep}{name}"], out[f"acc_norm{sep}{name}"] = r.acc, r.acc_norm
    return out


def routing_probe(
    model: MoETransformer, data: TokenData, trial: TrialConfig, device: torch.device, tasks: Tasks,
    base_loss: float, base_scores: dict[str, MCResult],
) -> dict[str, float]:
    """Loss increase (`L<i>`, `mean`) when one deeper-half MoE layer routes uniformly at random,
    layer by layer, against the trained model's `base_loss`; with downstream tasks, also the
    first task's accuracy drop (`acc_drop/L<i>`, `acc_drop/mean`), the measure UniPool's paper
    reports, against `base_scores`."""
    layers = [f.layer for f in model.moe_layers]
    if not layers:
        return {}
    first = next(iter(tasks.examples), None)
    one = Tasks({first: tasks.examples[first]}) if first else None
    out: dict[str, float] = {}
    try:
        for layer in layers[len(layers) // 2 :]:
            model.set_routing_probe([layer], candidates="pool", seed=trial.seed)
            out[f"L{layer}"] = macro(evaluate(model, data, trial, device)) - base_loss
            if one:
                acc = one.score(model, data.tokenizer, trial, device)[first].acc
                out[f"acc_drop/L{layer}"] = base_scores[first].acc - acc
    finally:
        model.set_routing_probe(None)
    probed = [k for k in out if k.startswith("L")]
    out["mean"] = sum(out[k] for k in probed) / len(probed)
    if one:
        out["acc_drop/mean"] = sum(out[f"acc_drop/{k}"] for k in probed) / len(probed)
    return out

"""Multiple-choice downstream evaluation, scored as lm-eval-harness scores `multiple_choice` tasks.

An example is a context and several choices; the model's answer is the choice whose tokens it
finds most likely after the context:

- `acc`: argmax over choices of the summed log-probability of the choice's tokens;
- `acc_norm`: the same sum divided by the choice's length in UTF-8 bytes, so long answers are not
  penalised for having more tokens (lm-eval-harness divides by characters; the two agree on ASCII).

Tokenisation follows lm-eval-harness: the context and the choice are encoded separately and the
ids concatenated, and each choice string is used exactly as given. So the separator between
context and answer belongs to the choice: write choices as " Paris" (or "\\nverse ..."), and
contexts without trailing whitespace. An empty context is scored after the end-of-text token.

Examples and task files: `examples`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.data.tokenizers import Tokenizer
from moe_core.errors import ConfigError
from moe_core.eval.examples import MCExample
from moe_core.model import MoETransformer


@dataclass(frozen=True)
class MCResult:
    acc: float
    acc_norm: float
    n: int
    logprobs: tuple[tuple[float, ...], ...]  # per example, per choice: summed log-prob of its tokens (nats)
    pred: tuple[int, ...]  # per example: the choice `acc` picks
    pred_norm: tuple[int, ...]  # per example: the choice `acc_norm` picks
    truncated: int  # choices longer than max_len tokens, scored on their last max_len tokens only


@dataclass(frozen=True)
class _Request:
    example: int
    choice: int
    ids: list[int]  # context + continuation tokens, truncated on the left to max_len + 1
    cont_len: int  # the last cont_len of `ids` are the continuation's scored tokens
    cut: bool  # the continuation alone is longer than max_len: only its last max_len tokens are scored


def score_choices(
    model: MoETransformer,
    tokenizer: Tokenizer,
    examples: list[MCExample],
    *,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    max_len: int | None = None,
) -> MCResult:
    """Score every (context, choice) request with one forward per batch of `batch_size` requests.

    Requests are sorted longest first (less padding) and right-padded; with causal attention the
    padding changes no real position's logits, with one MoE caveat: under a capacity factor, pad
    tokens take expert capacity like any token, so dropping models may score slightly differently
    at different batch sizes (dropless models do not). A request longer than `max_len` (default:
    the model's `seq_len`) keeps its last tokens, as lm-eval-harness does; should the choice alone
    be longer, only its last `max_len` tokens are scored (rare: counted in `MCResult.truncated`;
    lm-eval-harness has no answer for it) rather than failing the whole evaluation.

    The model runs in eval mode without autograd, which is what keeps the MoE layers' counters,
    loss-free biases and pool loads untouched (`moe.router.updates_state`), exactly as the
    trainer's `evaluate`; its training mode is restored afterwards. Inputs go to `device`
    (default: where the model's parameters are). Wrap the call in `torch.autocast` to score in
    reduced precision; log-softmax always runs in float32.
    """
    if not examples:
        raise ValueError("score_choices needs at least one example")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(f"the tokenizer's {tokenizer.vocab_size} ids do not fit the model's vocab_size "
                          f"{model.cfg.vocab_size}")
    limit = max_len or model.cfg.seq_len
    if limit > model.cfg.seq_len:
        raise ConfigError(f"max_len {limit} exceeds the model's seq_len {model.cfg.seq_len}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    requests = _requests(tokenizer, examples, limit)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    sums = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                for i, value in zip(chunk, _score_batch(model, [requests[i] for i in chunk], device)):
                    sums[i] = value
    finally:
        model.train(was_training)
    return _result(examples, requests, sums)


def _requests(tokenizer: Tokenizer, examples: list[MCExample], limit: int) -> list[_Request]:
    contexts = tokenizer.encode_batch([ex.context for ex in examples])
    flat = [(e, j, choice) for e, ex in enumerate(examples) for j, choice in enumerate(ex.choices)]
    continuations = tokenizer.encode_batch([choice for _, _, choice in flat])
    requests = []
    for (e, j, choice), cont in zip(flat, continuations):
        if not cont:
            raise ValueError(f"example {e} choice {j} ({choice!r}) has no tokens to score")
        ctx = contexts[e] or [tokenizer.eos_id]  # the first continuation token needs a position to predict it
        requests.append(_Request(e, j, (ctx + cont)[-(limit + 1) :], min(len(cont), limit), len(cont) > limit))
    return requests


def _score_batch(model: MoETransformer, batch: list[_Request], device: torch.device) -> list[float]:
    """Summed continuation log-probs of a batch: one forward, then log-softmax only at the
    continuation positions (the full (B, S, V) log-softmax would be the batch's largest tensor)."""
    width = max(len(r.ids) for r in batch) - 1
    inputs = torch.zeros(len(batch), width, dtype=torch.long)  # pad id 0: any valid id, never read
    rows, positions, targets = [], [], []  # one entry per continuation token
    for b, r in enumerate(batch):
        n = len(r.ids) - 1
        inputs[b, :n] = torch.tensor(r.ids[:-1])
        rows += [b] * r.cont_len
        positions += range(n - r.cont_len, n)
        targets += r.ids[-r.cont_len :]
    logits = model(inputs.to(device)).logits
    picked = logits[torch.tensor(rows, device=device), torch.tensor(positions, device=device)].float()
    token_lp = picked.log_softmax(-1).gather(-1, torch.tensor(targets, device=device)[:, None]).squeeze(-1)
    # Summed on the host in double precision (the batch's one host read): a long choice adds
    # hundreds of terms, and a float32 sum would drift by ~1e-5.
    sums = [0.0] * len(batch)
    for b, value in zip(rows, token_lp.tolist()):
        sums[b] += value
    return sums


def _result(examples: list[MCExample], requests: list[_Request], sums: list[float]) -> MCResult:
    logprobs: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    for r, value in zip(requests, sums):
        logprobs[r.example][r.choice] = value
    pred, pred_norm = [], []
    for ex, lps in zip(examples, logprobs):
        pred.append(_argmax(lps))
        pred_norm.append(_argmax([lp / len(c.encode("utf-8")) for lp, c in zip(lps, ex.choices)]))
    n = len(examples)
    return MCResult(
        acc=sum(p == ex.label for p, ex in zip(pred, examples)) / n,
        acc_norm=sum(p == ex.label for p, ex in zip(pred_norm, examples)) / n,
        n=n,
        logprobs=tuple(tuple(lps) for lps in logprobs),
        pred=tuple(pred),
        pred_norm=tuple(pred_norm),
        truncated=sum(r.cut for r in requests),
    )


def _argmax(values: list[float]) -> int:
    """First index of the maximum (ties go to the earlier choice, as numpy's argmax)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))

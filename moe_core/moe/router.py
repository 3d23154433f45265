"""Routing: score every routed expert of a layer, pick each expert set's top-k, and the
load-balancing formulas on those scores (the Switch form, which the aux loss and UniPool's pool
loss share: `parts.MoEParts.balance_terms` weighs them; router z-loss; loss-free bias update).

Shape legend: T tokens, D model dim, N routed experts (all sets), K chosen experts per token.
Router math runs in float32 whatever the autocast dtype: the gates and balance statistics are
small but their rounding steers which expert a token reaches. The logits' matmul may instead run
in the compute dtype (`RouterConfig.dtype: compute`, the dtype the layer hands the router), its
result taken to float32 at once.

With several expert sets (heterogeneous MoE) each set is balanced on its own, since a uniform
load means something different for sets of different (n, k): the Switch form
n_s * sum_{i in s} f_i * P_i is taken per set and averaged over sets, so a perfectly balanced
router gives exactly the loss weight, as in the homogeneous case.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_core.config import RouterConfig


@dataclass(frozen=True)
class SetSlice:
    """Where one expert set sits among the router's N columns (`cols`), its top-k, and where its
    k slots sit among a token's K chosen experts (`slots`)."""

    offset: int
    num_experts: int
    top_k: int
    first_slot: int = 0
    cols: slice = field(init=False, repr=False, compare=False)
    slots: slice = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Plain fields, not properties: the layer reads them on every forward.
        object.__setattr__(self, "cols", slice(self.offset, self.offset + self.num_experts))
        object.__setattr__(self, "slots", slice(self.first_slot, self.first_slot + self.top_k))


def expert_sets(experts: Sequence) -> tuple[SetSlice, ...]:
    """The `SetSlice` of each expert set of `MoEConfig.experts`, in column order."""
    offsets = [0, *accumulate(s.num_experts for s in experts)]
    slots = [0, *accumulate(s.top_k for s in experts)]
    return tuple(SetSlice(o, s.num_experts, s.top_k, k) for o, k, s in zip(offsets, slots, experts))


# UniPool's recipe: c from 100,000 draws of a numpy RandomState(42) (drawn in chunks of rows,
# the same stream as one draw at a time, to bound memory).
NORM_CONST_SAMPLES, NORM_CONST_SEED, _CHUNK = 100_000, 42, 10_000


@functools.lru_cache(maxsize=None)
def norm_router_constant(
    sets: tuple[tuple[int, int], ...], samples: int = NORM_CONST_SAMPLES, seed: int = NORM_CONST_SEED
) -> float:
    """UniPool's c = E[1 / ||y_k||], y = relu(x / ||x||), x ~ N(0, I_N), y_k its top-k entries.

    As the official NormRouter computes it (`_monte_carlo_y_k`: the mean of the reciprocals, not
    the reciprocal of the mean norm, which is 2-7% lower at 16-96 experts), from the same numpy
    stream: draw i is `RandomState(seed).randn(N)`'s i-th call, so one expert set gives the
    official value to rounding. `sets` lists (num_experts, top_k) of each expert set; with several
    (heterogeneous MoE), each takes its own top-k of the shared normalised scores and y_k is
    their union. The router keeps the value in a buffer, so a checkpoint carries the c it was
    trained with.
    """
    rng = np.random.RandomState(seed)
    width = sum(n for n, _ in sets)
    total, counted, done = 0.0, 0, 0
    while done < samples:
        rows = min(_CHUNK, samples - done)
        x = rng.randn(rows, width)  # row-major: row i is the i-th randn(width) of a loop
        y = np.maximum(0.0, x / np.linalg.norm(x, axis=1, keepdims=True))
        chosen, offset = [], 0
        for n, k in sets:
            part = np.sort(y[:, offset : offset + n], axis=1)
            chosen.append(part[:, n - k :])
            offset += n
        norms = np.sqrt((np.concatenate(chosen, axis=1) ** 2).sum(axis=1))
        # A draw with every x_i < 0 (probability 2^-N) scores 0 at any c and would make the
        # mean infinite; the official code never meets one at its pool sizes (N >= 96, seed 42).
        total += float((1.0 / norms[norms > 0]).sum())
        counted += int((norms > 0).sum())
        done += rows
    return total / counted


class Router(nn.Module):
    """One router weight matrix; PathMoE shares one across a block of consecutive layers.

    Scoring: softmax (probabilities), sigmoid (independent scores) or NormRouter
    (s = sigma * c * relu(z / (||z|| + eps)), UniPool), whose gate is the score itself.
    """

    def __init__(self, d_model: int, sets: tuple[tuple[int, int], ...], cfg: RouterConfig) -> None:
        """`sets`: (num_experts, top_k) of each expert set, in column order."""
        super().__init__()
        self.cfg = cfg
        self.weight_ND = nn.Parameter(torch.empty(sum(n for n, _ in sets), d_model))
        if cfg.scoring == "norm":
            self.sigma = nn.Parameter(torch.ones(()))
            self.register_buffer("norm_const", torch.tensor(norm_router_constant(sets)))

    def forward(self, x_TD: torch.Tensor, compute: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_TN, scores_TN), both float32. `compute`: the layer's compute dtype
        (`parts.compute_dtype`; None: x's), which the logits' matmul uses with `dtype: compute`."""
        dtype = torch.float32 if self.cfg.dtype == "float32" else (compute or x_TD.dtype)
        with torch.autocast(x_TD.device.type, enabled=False):
            logits = (x_TD.to(dtype) @ self.weight_ND.to(dtype).t()).float()
            if self.cfg.scoring == "softmax":
                scores = logits.softmax(dim=-1)
            elif self.cfg.scoring == "sigmoid":
                scores = logits.sigmoid()
            else:
                unit = logits / (logits.norm(dim=-1, keepdim=True) + self.cfg.norm_eps)
                scores = self.sigma.float() * self.norm_const * F.relu(unit)
        return logits, scores


def select_experts(
    scores_TN: torch.Tensor,
    sets: tuple[SetSlice, ...],
    bias_N: torch.Tensor | None,
    renormalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each set on (score + bias); gates are the unbiased scores of the chosen experts.

    The loss-free balancing bias steers only which experts are chosen, never the gate values
    (DeepSeek-V3). Returns (ids_TK, gates_TK) with ids global over the N columns.
    """
    with torch.no_grad():
        choose = scores_TN if bias_N is None else scores_TN + bias_N
        ids = [choose[:, s.cols].topk(s.top_k, dim=-1).indices + s.offset for s in sets]
        ids_TK = torch.cat(ids, dim=-1) if len(ids) > 1 else ids[0]
    return ids_TK, gate_values(scores_TN, ids_TK, renormalize)


def gate_values(scores_TN: torch.Tensor, ids_TK: torch.Tensor, renormalize: bool) -> torch.Tensor:
    gates = scores_TN.gather(-1, ids_TK)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return gates


def random_experts(
    num_tokens: int,
    sets: tuple[SetSlice, ...],
    candidates: list[torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """Routing probe: each token's k_s experts of each set drawn uniformly, without repeats,
    from that set's candidate ids (the whole set, or its most-used experts)."""
    ids = []
    for s, cand in zip(sets, candidates):
        draw = torch.rand(num_tokens, cand.numel(), generator=generator).argsort(dim=-1)[:, : s.top_k]
        ids.append(cand.cpu()[draw])
    return torch.cat(ids, dim=-1)



# -- load balancing --------------------------------------------------------------------------------
def updates_state(module: nn.Module) -> bool:
    """Loads, usage and pool statistics change only in a training forward with autograd on:
    never in eval mode, and never in a no_grad validation pass that forgot `model.eval()`."""
    return module.training and torch.is_grad_enabled()


def balance_probs(scores_TN: torch.Tensor, scoring: str, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """The per-token distribution P the balance losses average.

    Softmax: the probabilities, renormalised within each set. Sigmoid: scores normalised within
    each set (scores are independent). NormRouter: the scores themselves (UniPool, sec. 3).
    """
    if scoring == "norm":
        return scores_TN
    if scoring == "softmax" and len(sets) == 1:
        return scores_TN
    parts = [scores_TN[:, s.cols] for s in sets]
    return torch.cat([p / p.sum(dim=-1, keepdim=True).clamp_min(1e-20) for p in parts], dim=-1)


def load_fraction(counts_N: torch.Tensor, num_tokens: int | torch.Tensor, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """f_i = pairs routed to expert i / (T * k_s): each set's loads sum to 1 (detached)."""
    k = torch.cat([counts_N.new_full((s.num_experts,), s.top_k, dtype=torch.float32) for s in sets])
    return counts_N.detach().float() / (k * num_tokens)


def switch_loss(f_N: torch.Tensor, mean_p_N: torch.Tensor, sets: tuple[SetSlice, ...]) -> torch.Tensor:
    """n_s * sum_i f_i * P_i per set, averaged over sets (Fedus et al. 2021, eq. 4, unweighted)."""
    per_set = [s.num_experts * (f_N[s.cols] * mean_p_N[s.cols]).sum() for s in sets]
    return torch.stack(per_set).mean()


def z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (Zoph et al. 2022)."""
    return torch.logsumexp(logits_TN, dim=-1).square().mean()


@torch.no_grad()
def update_loss_free_bias(bias_N: torch.Tensor, counts_N: torch.Tensor, sets: tuple[SetSlice, ...], rate: float) -> None:
    """b_i += u * sign(mean load - load_i), in place, per set (Wang et al. 2024; DeepSeek-V3)."""
    for s in sets:
        load = counts_N[s.cols].float()
        bias_N[s.cols] += rate * torch.sign(load.mean() - load)


def routing_entropy(logits_TN: torch.Tensor, p_TN: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Mean per-token entropy (nats) of the routing distribution p normalised over experts.

    For a softmax, H = logsumexp(z) - sum_i p_i z_i, which needs no log of p: this runs every
    forward, over T x N entries.
    """
    if softmax:
        return (torch.logsumexp(logits_TN, dim=-1) - (p_TN * logits_TN).sum(dim=-1)).mean()
    dist = p_TN / p_TN.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(dist * dist.clamp_min(1e-20).log()).sum(dim=-1).mean()

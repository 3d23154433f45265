"""Routers: score every routed expert of a layer, then pick each expert set's top-k.

Shape legend: T tokens, D model dim, N routed experts (all sets), K chosen experts per token.
Router math runs in float32 whatever the autocast dtype: the gates and balance statistics are
small but their rounding steers which expert a token reaches. The logits' matmul may instead run
in the compute dtype (`RouterConfig.dtype: compute`), its result taken to float32 at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe_core.config import RouterConfig
from moe_core.moe.experts import compute_dtype


@dataclass(frozen=True)
class SetSlice:
    """Where one expert set sits among the router's N columns, and its top-k."""

    offset: int
    num_experts: int
    top_k: int

    @property
    def cols(self) -> slice:
        return slice(self.offset, self.offset + self.num_experts)


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

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits_TN, scores_TN), both float32."""
        dtype = torch.float32 if self.cfg.dtype == "float32" else compute_dtype(x_TD)
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

"""Sorting (token, slot) pairs by expert, and capacity dropping.

Shape legend: T tokens, K slots of one expert set (its top-k), P = K * T pairs, E experts.

Pairs are numbered slot-major: pair p = slot * T + token. A stable sort by expert then lists,
within each expert, every token's first choice before any second choice, and tokens in batch
order within a slot. With a capacity C, an expert keeps its first C pairs in that order and drops
the rest: first choices win over later ones, then earlier tokens win (the GShard/Switch policy).
A dropped pair contributes nothing; if all of a token's pairs drop, the token passes through the
residual connection alone.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import torch


def capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(CF * T * k / n): the most pairs one expert may take in a micro-batch.

    Computed in exact rational arithmetic from CF's decimal form: in floats 1.1 * 100 is
    110.00000000000001, whose ceiling would be one pair too many.
    """
    return math.ceil(Fraction(str(capacity_factor)) * num_tokens * top_k / num_experts)


@dataclass(frozen=True)
class Dispatch:
    """A routing of one expert set, sorted by expert, with dropped pairs already removed."""

    pair_P: torch.Tensor  # slot-major pair index of each kept pair, grouped by expert
    token_P: torch.Tensor  # token index of each kept pair
    kept_E: torch.Tensor  # kept pairs per expert (int64); sums to P
    routed_E: torch.Tensor  # pairs routed to each expert before dropping
    num_pairs: int  # K * T, kept or not

    @property
    def inverse_P(self) -> torch.Tensor:
        """Row of each pair in the sorted order (dropless only: then pair_P is a permutation)."""
        inv = torch.empty_like(self.pair_P)
        inv[self.pair_P] = torch.arange(self.pair_P.numel(), device=self.pair_P.device)
        return inv

    @property
    def num_dropped(self) -> torch.Tensor:
        return self.num_pairs - self.kept_E.sum()

    def keep_mask_TK(self, num_tokens: int) -> torch.Tensor:
        """Bool (T, K): whether each (token, slot) pair reaches its expert."""
        keep = torch.zeros(self.num_pairs, dtype=torch.bool, device=self.pair_P.device)
        keep[self.pair_P] = True
        return keep.view(-1, num_tokens).t()


def sort_by_expert(ids_TK: torch.Tensor, num_experts: int, cap: int | None = None) -> Dispatch:
    """Group the pairs of `ids_TK` (local expert ids) by expert; keep at most `cap` per expert."""
    num_tokens = ids_TK.shape[0]
    ids_P = ids_TK.t().reshape(-1)  # slot-major numbering, see module docstring
    order = torch.argsort(ids_P, stable=True)
    routed = torch.bincount(ids_P, minlength=num_experts)
    if cap is not None:
        starts = torch.cumsum(routed, 0) - routed
        rank = torch.arange(ids_P.numel(), device=ids_P.device) - starts[ids_P[order]]
        order = order[rank < cap]
        kept = routed.clamp(max=cap)
    else:
        kept = routed
    return Dispatch(
        pair_P=order,
        token_P=order % num_tokens,
        kept_E=kept,
        routed_E=routed,
        num_pairs=ids_P.numel(),
    )


def combine(y_PD: torch.Tensor, dispatch: Dispatch, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs without atomics: put rows back in slot-major pair order
    (a gather when nothing dropped, a scatter into zeros otherwise), then reduce over slots."""
    if dispatch.pair_P.numel() == dispatch.num_pairs:
        y_pairs = y_PD.index_select(0, dispatch.inverse_P)
    else:
        y_pairs = y_PD.new_zeros(dispatch.num_pairs, y_PD.shape[-1]).index_copy(0, dispatch.pair_P, y_PD)
    return y_pairs.view(-1, num_tokens, y_PD.shape[-1]).sum(dim=0)

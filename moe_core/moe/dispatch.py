"""Sorting (token, slot) pairs by expert, capacity dropping, and the two row maps between tokens
and pairs (gather and combine), all with static shapes and no host synchronisation.

Shape legend: T tokens, K slots of one expert set (its top-k), P = K * T pairs, E experts,
G groups of rows (the E experts, and a default expert with overflow), D feature width.

Pairs are numbered slot-major: pair p = slot * T + token. A stable sort by expert then lists,
within each expert, every token's first choice before any second choice, and tokens in batch
order within a slot. With a capacity C, an expert keeps its first C pairs in that order and drops
the rest: first choices win over later ones, then earlier tokens win (the GShard/Switch policy).
A dropped pair contributes nothing; if all of a token's pairs drop, the token passes through the
residual connection alone.

Every pair keeps its row, dropped or not: the sorted list always has exactly P rows and the
per-expert counts, offsets and capacity ranks are device tensors. So nothing here waits for the
GPU (no `bincount`, `nonzero`, boolean-mask indexing or `.item()`), shapes never depend on the
routing (torch.compile compiles once), and a dropped row is computed with a zero gate, which
makes its output and every gradient through it exactly zero. (At CF >= 1 that is no more work
than a fixed E * C slot buffer; at CF < 1 the dropped rows are computed and discarded.)

Overflow to a default expert (`MoEConfig.overflow`): instead of dropping them, the pairs over
capacity are re-labelled to an extra group E (the set's default expert, uncapped) and the pairs
re-sorted, stably, on the device: E + 1 groups cover every row, each row keeps its gate, and the
backends compute it like any other group. The router's own counts (routed, kept within capacity)
are still reported over the E routed experts, for the balance losses and the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import torch


def capacity(capacity_factor: float | tuple[int, int], num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(CF * T * k / n): the most pairs one expert may take in a micro-batch.

    Computed in exact rational arithmetic from CF's decimal form: in floats 1.1 * 100 is
    110.00000000000001, whose ceiling would be one pair too many. CF may be given as the
    (numerator, denominator) of `capacity_ratio`, which is plain integer arithmetic here (what
    torch.compile traces inside a layer).
    """
    num, den = capacity_factor if isinstance(capacity_factor, tuple) else capacity_ratio(capacity_factor)
    return -(-num * num_tokens * top_k // (den * num_experts))


def capacity_ratio(capacity_factor: float) -> tuple[int, int]:
    """CF's decimal form as an exact fraction (numerator, denominator): 1.1 -> (11, 10)."""
    frac = Fraction(str(capacity_factor))
    return frac.numerator, frac.denominator


@dataclass(frozen=True)
class Dispatch:
    """A routing of one expert set: all P pairs as rows sorted by expert (see module docstring)."""

    pair_P: torch.Tensor  # slot-major pair index of each row; a permutation of range(P)
    token_P: torch.Tensor  # token index of each row
    row_P: torch.Tensor  # the inverse permutation: row of each slot-major pair
    offsets_E: torch.Tensor  # int32 end row of each group: the E experts, then any default expert
    routed_E: torch.Tensor  # pairs the router sent to each routed expert (int64)
    kept_E: torch.Tensor  # pairs each routed expert computes: routed, or at most the capacity (int64)
    keep_P: torch.Tensor | None  # bool per row: computed; None when every row is (dropless, overflow)
    num_tokens: int
    ids_TK: torch.Tensor  # the group that computes each (token, slot): its expert, or E (the default expert)
    default_rows: torch.Tensor | None = None  # pairs over capacity the default expert computes

    @property
    def num_pairs(self) -> int:
        return self.pair_P.numel()

    @property
    def num_experts(self) -> int:
        """Routed experts (the router's columns); a default expert is one group more."""
        return self.routed_E.numel()

    @property
    def num_dropped(self) -> torch.Tensor:
        """Pairs computed by no expert (zero when the overflow goes to a default expert)."""
        dropped = self.routed_E.sum() - self.kept_E.sum()
        return dropped if self.default_rows is None else dropped - self.default_rows

    @property
    def computed_G(self) -> torch.Tensor:
        """Rows each group computes, in group order: kept pairs per expert, then the default
        expert's (the streamed path runs exactly these rows)."""
        return self.kept_E if self.default_rows is None else torch.cat([self.kept_E, self.default_rows[None]])

    def keep_mask_TK(self) -> torch.Tensor:
        """Bool (T, K): whether each (token, slot) pair reaches its expert."""
        if self.keep_P is None:
            return torch.ones(self.num_tokens, self.num_pairs // self.num_tokens, dtype=torch.bool,
                              device=self.pair_P.device)
        return self.keep_P.index_select(0, self.row_P).view(-1, self.num_tokens).t()

    def pair_gates(self, gates_TK: torch.Tensor) -> torch.Tensor:
        """Gate of each row (T, K) -> (P,), zero for dropped rows (and zero gradient to them)."""
        gates_P = gates_TK.t().reshape(-1).index_select(0, self.pair_P)
        return gates_P if self.keep_P is None else gates_P.masked_fill(~self.keep_P, 0.0)


def sort_by_expert(ids_TK: torch.Tensor, num_experts: int, cap: int | None = None) -> Dispatch:
    """Group the pairs of `ids_TK` (local expert ids) by expert; with `cap`, mark all but the first
    `cap` rows of each expert as dropped."""
    num_tokens = ids_TK.shape[0]
    ids_P = ids_TK.t().reshape(-1)  # slot-major numbering, see module docstring
    num_pairs, device = ids_P.numel(), ids_P.device
    sorted_ids, order = torch.sort(ids_P, stable=True)
    # Histogram and offsets from the sorted ids: a binary search per expert, no atomics.
    ends = torch.searchsorted(sorted_ids, torch.arange(num_experts, device=device, dtype=sorted_ids.dtype), right=True)
    routed = torch.diff(ends, prepend=ends.new_zeros(1))
    rows = torch.arange(num_pairs, device=device)
    keep, kept = None, routed
    if cap is not None:
        rank = rows - (ends - routed).index_select(0, sorted_ids)  # position within the expert's group
        keep, kept = rank < cap, routed.clamp(max=cap)
    return Dispatch(
        pair_P=order,
        token_P=order % num_tokens,
        row_P=torch.empty_like(order).scatter_(0, order, rows),
        offsets_E=ends.to(torch.int32),
        routed_E=routed,
        kept_E=kept,
        keep_P=keep,
        num_tokens=num_tokens,
        ids_TK=ids_TK,
    )


def sort_with_overflow(ids_TK: torch.Tensor, num_experts: int, cap: int) -> Dispatch:
    """Capacity as `sort_by_expert`, but the pairs over capacity go to a default expert, id
    `num_experts`, instead of being dropped: a dispatch over E + 1 groups (its `ids_TK` say which
    group computes each pair), whose counts stay the router's (see module docstring)."""
    capped = sort_by_expert(ids_TK, num_experts, cap)
    # Sorted again, stably, over E + 1 ids: the kept pairs keep their order within their expert,
    # and the default expert lists its pairs slot-major like any other.
    grouped = sort_by_expert(ids_TK.masked_fill(~capped.keep_mask_TK(), num_experts), num_experts + 1)
    default_rows = capped.routed_E.sum() - capped.kept_E.sum()
    return replace(grouped, routed_E=capped.routed_E, kept_E=capped.kept_E, default_rows=default_rows)


def dispatch_pairs(local_TK: torch.Tensor, num_experts: int, ratio: tuple[int, int] | None,
                   overflow_to_default: bool = False) -> Dispatch:
    """One expert set's pairs sorted by expert (`local_TK`: ids within the set): all of them
    when dropless (`ratio` None), else with the capacity the ratio gives (`capacity_ratio`),
    the pairs over it dropped or, with a default expert, computed by it (group `num_experts`)."""
    if ratio is None:
        return sort_by_expert(local_TK, num_experts)
    cap = capacity(ratio, local_TK.shape[0], local_TK.shape[1], num_experts)
    if overflow_to_default:
        return sort_with_overflow(local_TK, num_experts, cap)
    return sort_by_expert(local_TK, num_experts, cap)


def _sum_pairs(rows_PD: torch.Tensor, row_P: torch.Tensor, num_tokens: int, fused: bool) -> torch.Tensor:
    """Each token's sum over its K rows: back to slot-major order by a gather, then a sum over
    slots. Deterministic (no atomics); accumulates in float32 for low-precision rows. `fused`
    (CUDA, eager: `experts.fused_kernels_available`): one Triton kernel does both without the
    gathered copy (`triton_combine.py`)."""
    if fused:
        from moe_core.moe.triton_combine import combine_rows

        return combine_rows(rows_PD, row_P, num_tokens)
    return rows_PD.index_select(0, row_P).view(-1, num_tokens, rows_PD.shape[-1]).sum(dim=0)


class _GatherRows(torch.autograd.Function):
    """x_PD = x_TD[token_P]; the gradient of a token is the sum of its K rows' gradients, summed
    like the combine instead of `index_add_` (float atomics on GPUs, order-dependent)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, token_P: torch.Tensor, row_P: torch.Tensor, fused: bool) -> torch.Tensor:
        ctx.save_for_backward(token_P, row_P)
        ctx.num_tokens, ctx.fused = x_TD.shape[0], fused
        return x_TD.index_select(0, token_P)

    @staticmethod
    def backward(ctx, grad_PD: torch.Tensor):
        token_P, row_P = ctx.saved_tensors
        return _CombineRows.apply(grad_PD, token_P, row_P, ctx.num_tokens, ctx.fused), None, None, None


class _CombineRows(torch.autograd.Function):
    """y_TD[t] = sum of the rows of token t; the gradient of a row is its token's gradient."""

    @staticmethod
    def forward(ctx, y_PD: torch.Tensor, token_P: torch.Tensor, row_P: torch.Tensor, num_tokens: int,
                fused: bool) -> torch.Tensor:
        ctx.save_for_backward(token_P, row_P)
        ctx.fused = fused
        return _sum_pairs(y_PD, row_P, num_tokens, fused)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        token_P, row_P = ctx.saved_tensors
        return _GatherRows.apply(grad_TD, token_P, row_P, ctx.fused), None, None, None, None


def gather_rows(x_TD: torch.Tensor, dispatch: Dispatch, fused: bool = False) -> torch.Tensor:
    """(T, D) -> (P, D): each row's token, in expert order. Atomic-free backward; `fused`: its
    backward's sum by the Triton kernel (see `_sum_pairs`)."""
    return _GatherRows.apply(x_TD, dispatch.token_P, dispatch.row_P, fused)


def combine(y_PD: torch.Tensor, dispatch: Dispatch, fused: bool = False) -> torch.Tensor:
    """(P, D) -> (T, D): sum each token's rows (already gated; dropped rows are zero); `fused`:
    by the Triton kernel (see `_sum_pairs`)."""
    return _CombineRows.apply(y_PD, dispatch.token_P, dispatch.row_P, dispatch.num_tokens, fused)

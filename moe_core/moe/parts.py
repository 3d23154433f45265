"""What MoE layers may share, and what one forward takes from it: expert pools (UniPool: one
pool for a group of layers) and routers (PathMoE: one router for a block of layers).

The model registers the pools and routers (`model.pools`, `model.routers`: each parameter has
one name and one storage, and its gradient sums over every layer that used it); `MoEParts`
holds them for the layers and keeps a forward's state between `begin` and `end`:

- the weights a layer computes with (`weights`): each pool cast to the compute dtype once per
  forward, on its first layer, and handed to each of its layers as that one copy; dropped after
  its last layer (without autograd, e.g. evaluation, the copy is freed there). Under autocast a
  UniPool pool used by L layers so keeps one copy for backward, not L. The layers recomputed in
  the backward (activation checkpointing, last layer first) cast it again, once, and drop it
  after the pool's first layer;
- each layer's routing record (`report`), from which `balance_terms` gives the model the
  forward's weighted balance losses (and `model.routing_stats` its statistics). Only records of
  the forward count, never of a recomputation.

Casting to the compute dtype happens here and nowhere else: the layer takes `compute_dtype`
once, casts x, and hands the dtype to its router (whose logits may use it) and to `weights`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from moe_core.config import ModelConfig, MoEConfig
from moe_core.moe.experts import ExpertBank, ExpertWeights
from moe_core.moe.router import expert_sets, load_fraction, switch_loss, updates_state


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on (its dtype rules skip the ops
    the fast paths use, so they cast by hand), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertPool(nn.Module):
    """The routed experts one layer (layerwise) or a group of layers (UniPool) draws from: one
    bank per expert set.

    With `overflow: default_expert` each set's bank holds one expert more, last, of the set's
    width: the set's default expert, which the router never scores and which computes the pairs
    over capacity. It belongs to the pool like every other expert (shared by UniPool's layers).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        extra = int(cfg.moe.overflow == "default_expert")
        self.sets = nn.ModuleList(
            ExpertBank(s.num_experts + extra, cfg.d_model, cfg.expert_width(s.granularity)) for s in cfg.moe.experts
        )
        # UniPool's pool loss uses the previous micro-batch's layer-averaged loads, detached.
        self.register_buffer("prev_load_N", torch.zeros(cfg.moe.num_routed_experts))

    def cast(self, dtype: torch.dtype) -> tuple[PoolCast, ...]:
        """Each bank's weights in `dtype`, cast once for all the layers of one forward."""
        return tuple(PoolCast(bank, dtype) for bank in self.sets)


class _UseCast(torch.autograd.Function):
    """One layer's use of a weight's cast copy: the output aliases the copy, so autograd saves it
    once however many layers use it; the gradient goes to the weight in the weight's dtype, so
    the layers' gradients are summed in full precision, exactly as when each layer cast its own."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = weight.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class PoolCast:
    """A bank's weights in the compute dtype, copied once per forward for every layer that uses
    the bank (`ExpertPool.cast`)."""

    def __init__(self, bank: ExpertBank, dtype: torch.dtype) -> None:
        self.bank, self.dtype = bank, dtype
        w13, w2 = bank.w13_EDF2, bank.w2_EFD
        self.cast = None if w13.dtype == dtype else (w13.detach().to(dtype), w2.detach().to(dtype))

    def use(self) -> ExpertWeights:
        """The weights for one layer: the parameters themselves when no cast is needed."""
        if self.cast is None:
            return ExpertWeights(self.bank.w13_EDF2, self.bank.w2_EFD)
        return ExpertWeights(_UseCast.apply(self.bank.w13_EDF2, self.cast[0]),
                             _UseCast.apply(self.bank.w2_EFD, self.cast[1]))


@dataclass(frozen=True)
class LayerRouting:
    """What one MoE layer's forward reports: losses (with grad) and statistics (detached)."""

    layer: int
    pool: int
    num_tokens: int
    ids_TK: torch.Tensor  # chosen experts, ids over the pool's N experts
    routed_N: torch.Tensor  # pairs routed to each expert (before dropping)
    kept_N: torch.Tensor  # pairs each expert computed within capacity
    default_pairs: torch.Tensor  # pairs over capacity the default experts computed (0 unless overflow)
    mean_p_N: torch.Tensor  # mean balance probability per expert (grad)
    aux: torch.Tensor  # Switch loss, unweighted (grad)
    z: torch.Tensor  # router z-loss, unweighted (grad)
    entropy: torch.Tensor  # mean per-token routing entropy, nats
    # Share of tokens whose chosen experts all score 0 (gate 0: the layer adds nothing and its
    # router gets no gradient from them). Only NormRouter's ReLU can do this; a router that a
    # balance loss pushed into the negative orthant for every token is dead (README: UniPool).
    silent: torch.Tensor

    def detached(self) -> "LayerRouting":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.detach() for k, v in values.items() if isinstance(v, torch.Tensor)})


class MoEParts:
    """The model's pools and routers, and one forward's casts and routing records (see the module
    docstring). Not a module: the model registers `pools` and `routers` itself."""

    def __init__(self, pools: nn.ModuleList, routers: nn.ModuleList, pool_of_layer: dict[int, int],
                 moe: MoEConfig) -> None:
        self.pools, self.routers = pools, routers
        self.balance, self.sets = moe.balance, expert_sets(moe.experts)
        # When a pool's cast is no longer needed: after its last layer in a forward, after its
        # first in a recomputation (the backward runs the layers in reverse).
        self.last_layer = {pool: layer for layer, pool in sorted(pool_of_layer.items())}
        self.first_layer = {pool: layer for layer, pool in sorted(pool_of_layer.items(), reverse=True)}
        self._casts: dict[int, tuple[PoolCast, ...]] = {}
        self._records: list[LayerRouting] | None = None  # None: not in a forward (a recomputation)
        self.last_routing: list[LayerRouting] = []  # the latest forward's records, detached

    def begin(self) -> None:
        """A forward starts: no casts yet, and its layers' records are collected."""
        self._casts, self._records = {}, []

    def end(self) -> list[LayerRouting]:
        """The forward's routing records, in layer order (kept detached as `last_routing`);
        recomputations report nothing."""
        records, self._records = self._records or [], None
        self.last_routing = [r.detached() for r in records]
        return records

    def weights(self, pool: int, layer: int, dtype: torch.dtype) -> tuple[ExpertWeights, ...]:
        """Pool `pool`'s weights in `dtype` for MoE layer `layer`, one per expert set."""
        casts = self._casts.get(pool)
        if casts is None:
            casts = self.pools[pool].cast(dtype)
        done = self.last_layer if self._records is not None else self.first_layer
        if layer == done[pool]:
            self._casts.pop(pool, None)
        else:
            self._casts[pool] = casts
        return tuple(c.use() for c in casts)

    def report(self, record: LayerRouting) -> None:
        """A layer's routing in this forward (a recomputation's is dropped: the forward's counts)."""
        if self._records is not None:
            self._records.append(record)

    def balance_terms(self, records: list[LayerRouting]) -> dict[str, torch.Tensor]:
        """A forward's weighted balance losses from its layers' records, each averaged over layers
        so a weight means the same at any depth."""
        if not records:
            return {}
        bal = self.balance
        terms = {}
        if bal.aux_weight > 0:
            terms["aux"] = bal.aux_weight * torch.stack([r.aux for r in records]).mean()
        if bal.z_weight > 0:
            terms["z"] = bal.z_weight * torch.stack([r.z for r in records]).mean()
        if bal.pool_weight > 0:
            terms["pool"] = bal.pool_weight * self._pool_loss(records)
        return terms

    def _pool_loss(self, records: list[LayerRouting]) -> torch.Tensor:
        """UniPool: alpha * M * sum_i fbar_i * Pbar_i per pool, fbar from the previous micro-batch,
        summed over pools (grouped pools: each group's loss at the full alpha, as the official code
        keeps one accumulator per group and adds them).

        fbar (layer-averaged loads) is detached and one micro-batch old, so the loss trains only the
        routers; the first micro-batch has no previous loads and contributes zero.
        """
        by_pool: dict[int, list[LayerRouting]] = defaultdict(list)
        for r in records:
            by_pool[r.pool].append(r)
        losses = []
        for pid, recs in by_pool.items():
            pool = self.pools[pid]
            mean_p = torch.stack([r.mean_p_N for r in recs]).mean(dim=0)
            # prev_load_N starts at zero, so the first micro-batch's loss is exactly zero.
            losses.append(switch_loss(pool.prev_load_N.clone(), mean_p, self.sets))
            if updates_state(pool):
                f_now = torch.stack([load_fraction(r.routed_N, r.num_tokens, self.sets) for r in recs]).mean(dim=0)
                pool.prev_load_N.copy_(f_now)
        return torch.stack(losses).sum()

"""One MoE FFN layer: route, compute the chosen experts, add the shared experts, report.

Shape legend: B batch, S sequence, T = B * S tokens, D model dim, N routed experts, K = sum of
the sets' top-k.

A layer owns only what is its own: shared (always-on) experts, its loss-free balancing bias and
its usage counters. The router and the expert pool are passed in by the model, because PathMoE
shares a router across layers and UniPool shares a pool across layers: each parameter then has
one name and one storage, and its gradient sums over every layer that used it. The model passes
the pool's weights already cast for the forward (`PoolWeights`), so a shared pool is cast once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from itertools import accumulate

import torch
from torch import nn

from moe_core.config import ModelConfig
from moe_core.layers import SwiGLU
from moe_core.moe.balance import balance_probs, load_fraction, switch_loss, update_loss_free_bias, z_loss
from moe_core.moe.dispatch import Dispatch, capacity, capacity_ratio, sort_by_expert, sort_with_overflow
from moe_core.moe.experts import (
    BACKENDS, BankCast, ExpertBank, Experts, ExpertWeights, experts_reference, resolve_backend,
)
from moe_core.moe.router import Router, SetSlice, gate_values, random_experts, select_experts


def updates_state(module: nn.Module) -> bool:
    """Loads, usage and pool statistics change only in a training forward with autograd on:
    never in eval mode, and never in a no_grad validation pass that forgot `model.eval()`."""
    return module.training and torch.is_grad_enabled()


class ExpertPool(nn.Module):
    """The routed experts one layer (layerwise) or a group of layers (UniPool) draws from.

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

    def cast(self, dtype: torch.dtype) -> list[BankCast]:
        """Each bank's weights in `dtype`, cast once for all the layers of one forward."""
        return [BankCast(bank, dtype) for bank in self.sets]


@dataclass(frozen=True)
class PoolWeights:
    """A pool's weights as one layer computes with them (`ExpertPool.cast`)."""

    sets: tuple[ExpertWeights, ...]


@dataclass(frozen=True)
class ProbeSpec:
    """Routing probe: replace learned top-k by uniform random experts (eval only)."""

    candidates: str  # "pool": any expert of the set; "top8": the layer's 8 most-used experts
    seed: int = 0


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


class MoEFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, pool: int, router: int) -> None:
        super().__init__()
        moe = cfg.moe
        self.layer, self.pool, self.router = layer, pool, router  # indices into the model's lists
        self.balance, self.router_cfg = moe.balance, moe.router
        self.capacity_factor, self.backend = moe.capacity_factor, moe.backend
        self.capacity_ratio = None if moe.capacity_factor is None else capacity_ratio(moe.capacity_factor)
        self.overflow_to_default = moe.overflow == "default_expert"
        offsets = [0, *accumulate(s.num_experts for s in moe.experts)]
        self.sets = tuple(SetSlice(o, s.num_experts, s.top_k) for o, s in zip(offsets, moe.experts))
        slot_offsets = [0, *accumulate(s.top_k for s in moe.experts)]
        self.slot_cols = tuple(slice(a, b) for a, b in zip(slot_offsets, slot_offsets[1:]))
        self.shared = SwiGLU(cfg.d_model, cfg.shared_width) if moe.shared_experts else None
        n = moe.num_routed_experts
        self.register_buffer("bias_N", torch.zeros(n))  # loss-free balancing; no gradient, saved
        self.register_buffer("usage_N", torch.zeros(n, dtype=torch.int64))  # training pairs per expert
        # Loads of the current optimizer step: global-batch aux loss and the bias update use them.
        self.register_buffer("step_counts_N", torch.zeros(n, dtype=torch.int64), persistent=False)
        self.register_buffer("step_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.probe: ProbeSpec | None = None
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. all-reduce sum

    def forward(
        self, x_BSD: torch.Tensor, router: Router, pool: ExpertPool | PoolWeights
    ) -> tuple[torch.Tensor, LayerRouting]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        num_tokens = x_TD.shape[0]
        logits_TN, scores_TN = router(x_TD)
        ids_TK, gates_TK = self._route(scores_TN)

        # The sets' outputs are summed in x's dtype (float32 under autocast), as if added to a
        # zero tensor of x's dtype, without writing and reading that tensor.
        y_TD = None if self.shared is None else self.shared(x_TD)
        routed, kept, defaulted = [], [], []
        for s, cols, bank in zip(self.sets, self.slot_cols, pool.sets):
            local_TK, dispatch = self._dispatch(ids_TK[:, cols] - s.offset, s.num_experts, s.top_k)
            y_set = self._experts(bank, x_TD, local_TK, gates_TK[:, cols], dispatch)
            y_TD = y_set.to(x_TD.dtype) if y_TD is None else y_TD + y_set
            routed.append(dispatch.routed_E)
            kept.append(dispatch.kept_E)
            if dispatch.default_rows is not None:
                defaulted.append(dispatch.default_rows)
        routed_N, kept_N = torch.cat(routed), torch.cat(kept)
        default_pairs = torch.stack(defaulted).sum() if defaulted else routed_N.new_zeros(())
        routing = self._report(num_tokens, logits_TN, scores_TN, ids_TK, routed_N, kept_N, default_pairs)
        return y_TD.view_as(x_BSD), routing

    def _dispatch(self, local_TK: torch.Tensor, num_experts: int, top_k: int) -> tuple[torch.Tensor, Dispatch]:
        """The set's pairs sorted by expert, and the ids that compute them (the default expert's,
        `num_experts`, for the overflow)."""
        num_tokens = local_TK.shape[0]
        cap = None if self.capacity_ratio is None else capacity(self.capacity_ratio, num_tokens, top_k, num_experts)
        if self.overflow_to_default:
            return sort_with_overflow(local_TK, num_experts, cap)
        return local_TK, sort_by_expert(local_TK, num_experts, cap)

    def _route(self, scores_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        renorm = self.router_cfg.renormalize
        if self.probe is None:
            bias = self.bias_N if self.balance.bias_rate > 0 else None
            return select_experts(scores_TN, self.sets, bias, renorm)
        if self.training:
            raise RuntimeError("the routing probe is an evaluation-time switch: call model.eval() first")
        gen = torch.Generator().manual_seed(self.probe.seed * 100_003 + self.layer)
        ids_TK = random_experts(scores_TN.shape[0], self.sets, self._probe_candidates(), gen).to(scores_TN.device)
        return ids_TK, gate_values(scores_TN, ids_TK, renorm)

    def _probe_candidates(self) -> list[torch.Tensor]:
        cands = []
        for s in self.sets:
            if self.probe.candidates == "pool" or s.num_experts <= 8:
                cands.append(torch.arange(s.offset, s.offset + s.num_experts))
            else:
                top = self.usage_N[s.cols].topk(max(8, s.top_k)).indices
                cands.append(top.cpu() + s.offset)
        return cands

    def _experts(self, bank: Experts, x_TD, local_TK, gates_TK, dispatch) -> torch.Tensor:
        backend = resolve_backend(self.backend, x_TD.device)
        if backend == "reference":
            return experts_reference(bank, x_TD, local_TK, gates_TK, dispatch.keep_mask_TK())
        return BACKENDS[backend](bank, x_TD, dispatch, gates_TK)

    def _report(self, num_tokens, logits_TN, scores_TN, ids_TK, routed_N, kept_N, default_pairs) -> LayerRouting:
        p_TN = balance_probs(scores_TN, self.router_cfg.scoring, self.sets)
        mean_p_N = p_TN.mean(dim=0)
        if updates_state(self):
            self.step_counts_N += routed_N
            self.step_tokens += num_tokens
            self.usage_N += routed_N
        if updates_state(self) and self.balance.aux_scope == "global_batch":
            # f from every micro-batch of this optimizer step so far (detached), summed over
            # data-parallel workers when the trainer set a reducer; see README.
            counts, tokens = self.step_counts_N, self.step_tokens
            if self.count_reducer is not None:
                counts, tokens = self.count_reducer(counts.clone()), self.count_reducer(tokens.clone())
            f_N = load_fraction(counts, tokens, self.sets)
        else:
            f_N = load_fraction(routed_N, num_tokens, self.sets)
        zero = logits_TN.new_zeros(())
        with torch.no_grad():
            entropy = routing_entropy(logits_TN, p_TN, softmax=self.router_cfg.scoring == "softmax" and len(self.sets) == 1)
            # Softmax and sigmoid scores are never 0: only NormRouter pays for the check.
            silent = ((scores_TN.gather(1, ids_TK) <= 0).all(dim=1).float().mean()
                      if self.router_cfg.scoring == "norm" else zero)
        return LayerRouting(
            layer=self.layer,
            pool=self.pool,
            num_tokens=num_tokens,
            ids_TK=ids_TK,
            routed_N=routed_N,
            kept_N=kept_N,
            default_pairs=default_pairs,
            mean_p_N=mean_p_N,
            aux=switch_loss(f_N, mean_p_N, self.sets) if self.balance.aux_weight > 0 else zero,
            z=z_loss(logits_TN) if self.balance.z_weight > 0 else zero,
            entropy=entropy,
            silent=silent,
        )

    @torch.no_grad()
    def finish_step(self) -> None:
        """After an optimizer step: move the loss-free bias against this step's loads, reset them.
        A step without tokens has all loads zero and so moves no bias: no check (and no host
        read) needed."""
        if self.balance.bias_rate > 0:
            update_loss_free_bias(self.bias_N, self.step_counts_N, self.sets, self.balance.bias_rate)
        self.step_counts_N.zero_()
        self.step_tokens.zero_()


def routing_entropy(logits_TN: torch.Tensor, p_TN: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Mean per-token entropy (nats) of the routing distribution p normalised over experts.

    For a softmax, H = logsumexp(z) - sum_i p_i z_i, which needs no log of p: this runs every
    forward, over T x N entries.
    """
    if softmax:
        return (torch.logsumexp(logits_TN, dim=-1) - (p_TN * logits_TN).sum(dim=-1)).mean()
    dist = p_TN / p_TN.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return -(dist * dist.clamp_min(1e-20).log()).sum(dim=-1).mean()

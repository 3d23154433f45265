"""One MoE FFN layer: route, compute the chosen experts, add the shared experts, report.

Shape legend: B batch, S sequence, T = B * S tokens, D model dim, N routed experts, K = sum of
the sets' top-k.

A block calls it as it calls a dense FFN, `ffn(x)`. A layer owns only what is its own: shared
(always-on) experts, its loss-free balancing bias and its usage counters. Its router and its
expert pool may serve other layers too (PathMoE shares a router across layers, UniPool a pool):
it takes them from the model's `MoEParts` (`parts.py`), which casts a pool once per forward for
all its layers, and it reports its routing there (`LayerRouting`), for the model's balance
terms and statistics.

The forward, top to bottom: the router scores (`router.py`) and the top-k per expert set; per
set, the pairs sorted by expert (`dispatch.py`) and the experts computed (`experts.py`); the
report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_core.config import ModelConfig
from moe_core.layers import SwiGLU
from moe_core.moe.dispatch import Dispatch, capacity_ratio, dispatch_pairs
from moe_core.moe.experts import backend_for
from moe_core.moe.parts import LayerRouting, MoEParts, compute_dtype
from moe_core.moe.router import (
    balance_probs,
    expert_sets,
    gate_values,
    load_fraction,
    random_experts,
    routing_entropy,
    select_experts,
    switch_loss,
    update_loss_free_bias,
    updates_state,
    z_loss,
)


@dataclass(frozen=True)
class ProbeSpec:
    """Routing probe: replace learned top-k by uniform random experts (eval only)."""

    candidates: str  # "pool": any expert of the set; "top8": the layer's 8 most-used experts
    seed: int = 0


class MoEFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, pool: int, router: int, parts: MoEParts) -> None:
        super().__init__()
        moe = cfg.moe
        self.layer, self.pool, self.router = layer, pool, router  # indices into the model's lists
        self.parts = parts  # not a module: the model registers the pools and routers
        self.balance, self.router_cfg = moe.balance, moe.router
        self.backend = moe.backend
        self.capacity_ratio = None if moe.capacity_factor is None else capacity_ratio(moe.capacity_factor)
        self.overflow_to_default = moe.overflow == "default_expert"
        self.sets = expert_sets(moe.experts)
        self.shared = SwiGLU(cfg.d_model, cfg.shared_width) if moe.shared_experts else None
        n = moe.num_routed_experts
        self.register_buffer("bias_N", torch.zeros(n))  # loss-free balancing; no gradient, saved
        self.register_buffer("usage_N", torch.zeros(n, dtype=torch.int64))  # training pairs per expert
        # Loads of the current optimizer step: global-batch aux loss and the bias update use them.
        self.register_buffer("step_counts_N", torch.zeros(n, dtype=torch.int64), persistent=False)
        self.register_buffer("step_tokens", torch.zeros((), dtype=torch.int64), persistent=False)
        self.probe: ProbeSpec | None = None
        self.count_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None  # e.g. all-reduce sum

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        # The compute dtype: the pool's weights (cast once per forward for all its layers) and,
        # with `router.dtype: compute`, the router's logits use it.
        dtype = compute_dtype(x_TD)
        weights = self.parts.weights(self.pool, self.layer, dtype)
        logits_TN, scores_TN = self.parts.routers[self.router](x_TD, dtype)
        if self.probe is None:
            bias = self.bias_N if self.balance.bias_rate > 0 else None
            ids_TK, gates_TK = select_experts(scores_TN, self.sets, bias, self.router_cfg.renormalize)
        else:
            ids_TK, gates_TK = self._probe_route(scores_TN)

        # The sets' outputs are summed in x's dtype (float32 under autocast), as if added to a
        # zero tensor of x's dtype, without writing and reading that tensor.
        y_TD = None if self.shared is None else self.shared(x_TD)
        dispatches = []
        for s, w in zip(self.sets, weights):
            dispatch = dispatch_pairs(ids_TK[:, s.slots] - s.offset, s.num_experts, self.capacity_ratio,
                                      self.overflow_to_default)
            y_set = backend_for(self.backend, x_TD.device)(w, x_TD, dispatch, gates_TK[:, s.slots])
            y_TD = y_set.to(x_TD.dtype) if y_TD is None else y_TD + y_set
            dispatches.append(dispatch)
        self.parts.report(self._report(logits_TN, scores_TN, ids_TK, dispatches))
        return y_TD.view_as(x_BSD)

    def _probe_route(self, scores_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing probe's experts, drawn at random (`ProbeSpec`), and their gates."""
        if self.training:
            raise RuntimeError("the routing probe is an evaluation-time switch: call model.eval() first")
        gen = torch.Generator().manual_seed(self.probe.seed * 100_003 + self.layer)
        ids_TK = random_experts(scores_TN.shape[0], self.sets, self._probe_candidates(), gen).to(scores_TN.device)
        return ids_TK, gate_values(scores_TN, ids_TK, self.router_cfg.renormalize)

    def _probe_candidates(self) -> list[torch.Tensor]:
        cands = []
        for s in self.sets:
            if self.probe.candidates == "pool" or s.num_experts <= 8:
                cands.append(torch.arange(s.offset, s.offset + s.num_experts))
            else:
                top = self.usage_N[s.cols].topk(max(8, s.top_k)).indices
                cands.append(top.cpu() + s.offset)
        return cands

    def _report(self, logits_TN, scores_TN, ids_TK, dispatches: list[Dispatch]) -> LayerRouting:
        num_tokens = ids_TK.shape[0]
        routed_N = torch.cat([d.routed_E for d in dispatches])
        kept_N = torch.cat([d.kept_E for d in dispatches])
        defaulted = [d.default_rows for d in dispatches if d.default_rows is not None]
        default_pairs = torch.stack(defaulted).sum() if defaulted else routed_N.new_zeros(())
        training = updates_state(self)
        if training:
            self.step_counts_N += routed_N
            self.step_tokens += num_tokens
            self.usage_N += routed_N
        counts, tokens = routed_N, num_tokens
        if training and self.balance.aux_scope == "global_batch":
            # f from every micro-batch of this optimizer step so far (detached), summed over
            # data-parallel workers when the trainer set a reducer; see README.
            counts, tokens = self.step_counts_N, self.step_tokens
            if self.count_reducer is not None:
                counts, tokens = self.count_reducer(counts.clone()), self.count_reducer(tokens.clone())
        scoring, zero = self.router_cfg.scoring, logits_TN.new_zeros(())
        p_TN = balance_probs(scores_TN, scoring, self.sets)
        mean_p_N = p_TN.mean(dim=0)
        aux = switch_loss(load_fraction(counts, tokens, self.sets), mean_p_N, self.sets) if self.balance.aux_weight > 0 else zero
        with torch.no_grad():
            entropy = routing_entropy(logits_TN, p_TN, softmax=scoring == "softmax" and len(self.sets) == 1)
            # Softmax and sigmoid scores are never 0: only NormRouter pays for the check.
            silent = (scores_TN.gather(1, ids_TK) <= 0).all(dim=1).float().mean() if scoring == "norm" else zero
        return LayerRouting(
            layer=self.layer,
            pool=self.pool,
            num_tokens=num_tokens,
            ids_TK=ids_TK,
            routed_N=routed_N,
            kept_N=kept_N,
            default_pairs=default_pairs,
            mean_p_N=mean_p_N,
            aux=aux,
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

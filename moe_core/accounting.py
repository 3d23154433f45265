"""Parameter and FLOP accounting from a config alone, the one place these conventions live.

Parameters are counted exactly as the built model holds them (a test pins `total` to
`sum(p.numel())`), counting a UniPool pool and a PathMoE router once however many layers use it.

Active parameters are those one token touches, counted once per use, so that they measure
compute: every layer's router (a token is scored against all experts), its top-k experts of each
set and the shared experts, attention and norms. A UniPool expert or a PathMoE router used by
several layers counts once per layer in `active` but once in `total`. The input
embedding is a lookup; the output head is a matmul. Both are reported apart as `embedding`.

FLOPs convention (PaLM, Chowdhery et al. 2022, appendix B): training FLOPs per token =
6 * (active non-embedding params + output head V * d) + 12 * n_layers * d_attn * seq_len,
with d_attn = n_heads * head_dim and no discount for the causal mask. The head costs V * d even
when tied; the input embedding lookup costs nothing.

Matching and budget convention (the one rule the planner, the trainer and the result columns
share). Routers are left out of the *matched* counts: a router has n * d parameters per MoE layer,
so it grows with the expert count, and counting it would give trials of one scale different
budgets for the one knob under study. `matched_active` and `matched_flops_per_token` are therefore
equal across a FLOP-matched scale; the router is reported apart (`active_router`,
`router_flops_per_token`). A trial's default budget is `tokens_per_active_param` (20, the
compute-optimal ratio the design study uses) times the matched count named by
`train.budget_params`, rounded up to whole optimizer steps (`training_steps`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moe_core.config import ModelConfig
from moe_core.train.config import BudgetParams, TrainConfig

DEFAULT_TOKENS_PER_ACTIVE_PARAM = 20.0


@dataclass(frozen=True)
class ParamCount:
    """What one config costs. All counts are numbers of scalars."""

    total: int  # every parameter the model holds
    active: int  # parameters one token uses, embeddings included
    embedding: int  # input embedding + untied output head (held)
    active_non_embedding: int  # `active` without embedding and head
    expert: int  # routed expert parameters held (pools counted once)
    active_expert: int  # routed expert parameters one token uses
    router: int  # router parameters held (PathMoE-shared routers counted once)
    active_router: int  # router parameters one token uses (once per MoE layer); grows with n
    flops_per_token: int  # training (forward + backward) FLOPs per token

    @property
    def matched_active(self) -> int:
        """Active parameters without routers: equal for every FLOP-matched trial of a scale."""
        return self.active - self.active_router

    @property
    def matched_active_non_embedding(self) -> int:
        return self.active_non_embedding - self.active_router

    @property
    def router_flops_per_token(self) -> int:
        return 6 * self.active_router

    @property
    def matched_flops_per_token(self) -> int:
        """Training FLOPs per token without routers: equal across a FLOP-matched scale."""
        return self.flops_per_token - self.router_flops_per_token

    def budget_params(self, basis: BudgetParams) -> int:
        """The parameter count a `tokens_per_active_param` budget multiplies (see module doc)."""
        return self.matched_active if basis == "active" else self.matched_active_non_embedding

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _swiglu(d: int, width: int) -> int:
    return 3 * d * width


def count_params(cfg: ModelConfig) -> ParamCount:
    """Exact parameter counts and training FLOPs per token for `cfg`."""
    d, moe = cfg.d_model, cfg.moe
    attn = d * cfg.n_heads * cfg.head_dim + 2 * d * cfg.kv_heads * cfg.head_dim + cfg.n_heads * cfg.head_dim * d
    norms = 2 * d
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe

    dense_ffn = _swiglu(d, cfg.d_ff)
    # overflow: default_expert adds one expert per set per pool; it takes a routed pair's place
    # (same width), so active parameters and FLOPs do not change.
    extra = int(moe.overflow == "default_expert")
    per_pool = sum((s.num_experts + extra) * _swiglu(d, cfg.expert_width(s.granularity)) for s in moe.experts)
    active_per_layer = sum(s.top_k * _swiglu(d, cfg.expert_width(s.granularity)) for s in moe.experts)
    router = moe.num_routed_experts * d + (1 if moe.router.scoring == "norm" else 0)  # + NormRouter's sigma
    shared = _swiglu(d, cfg.shared_width)

    expert = cfg.num_pools * per_pool
    active_expert = n_moe * active_per_layer
    router_active = n_moe * router  # every MoE layer uses a (possibly shared) router once
    body_held = cfg.n_layers * (attn + norms) + n_dense * dense_ffn + n_moe * shared + d  # + final norm
    body_active = body_held + active_expert + router_active

    head = cfg.vocab_size * d
    embedding = head if cfg.tie_embeddings else 2 * head
    total = body_held + expert + cfg.num_routers * router + embedding
    flops = 6 * (body_active + head) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.seq_len
    return ParamCount(
        total=total,
        active=body_active + embedding,
        embedding=embedding,
        active_non_embedding=body_active,
        expert=expert,
        active_expert=active_expert,
        router=cfg.num_routers * router,
        active_router=router_active,
        flops_per_token=flops,
    )


def training_steps(model: ModelConfig, train: TrainConfig) -> int:
    """Optimizer steps of a trial: `train.steps`, else `train.tokens`, else
    `tokens_per_active_param` (default 20) x the `train.budget_params` count, rounded up to whole
    steps. The one rule every caller (trainer, planner, result columns) uses."""
    if train.steps is not None:
        return train.steps
    if train.tokens is not None:
        return max(1, math.ceil(train.tokens / train.batch_tokens))
    per_param = train.tokens_per_active_param or DEFAULT_TOKENS_PER_ACTIVE_PARAM
    budget = per_param * count_params(model).budget_params(train.budget_params)
    return max(1, math.ceil(budget / train.batch_tokens))

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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moe_core.config import ModelConfig


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
    per_pool = sum(s.num_experts * _swiglu(d, cfg.expert_width(s.granularity)) for s in moe.experts)
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

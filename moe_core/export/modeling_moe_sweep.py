"""A moe-sweep model for transformers (remote code): the inference forward of every MoE variant
moe_core trains, for exports that no class shipped with transformers can express.

moe_core's exporter copies this file and `configuration_moe_sweep.py` next to the weights, so it
depends on torch and transformers alone, never on moe_core. It covers expert pools shared by
several layers (UniPool), routers shared by consecutive layers (PathMoE), several expert sizes in
one layer, shared (always-on) experts, softmax, sigmoid and NormRouter scoring, a loss-free
balancing bias on expert selection, expert capacity with dropping or a default expert, and dense
and MoE layers mixed. See `MoESweepConfig` for how the structure is described.

A plain reference implementation (a loop over experts) and no KV cache, on purpose: with an expert
capacity, which pairs an expert drops depends on every token of the forward (a later token's first
choice beats an earlier token's second choice), so a token's output is reproduced only by
recomputing the whole sequence, exactly as the trained model saw it. `generate` therefore feeds
the whole sequence at every step.

Weights follow Llama's names and layout where the parts are Llama's: q/k projections use the
half-split rotary layout (`rotate_half`), gate/up/down projections are separate. Expert banks are
stacked per set: `gate_proj`, `up_proj` (E, F, D) and `down_proj` (E, D, F).

Shape legend: B batch, S sequence, T = B * S tokens, D model dim, H heads, K kv heads, E head dim,
N routed experts of a layer (all sets), F expert width.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast

from .configuration_moe_sweep import MoESweepConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x_BHSE: torch.Tensor, positions_BS: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE, half-split layout. Angles are computed in float64 and rounded once, as in training,
    so the logits match the trained model's to rounding."""
    dim = x_BHSE.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x_BHSE.device) / dim))
    angles = positions_BS.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, S, E)
    cos, sin = angles.cos().to(x_BHSE.dtype), angles.sin().to(x_BHSE.dtype)
    return x_BHSE * cos + rotate_half(x_BHSE) * sin


class Attention(nn.Module):
    """Causal grouped-query attention, no biases; kv head j serves query heads j*H/K ... ."""

    def __init__(self, config: MoESweepConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.theta = config.rope_theta
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)

    def forward(
        self, x_BSD: torch.Tensor, positions_BS: torch.Tensor, allowed_BSS: torch.Tensor | None
    ) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, positions_BS, self.theta), apply_rotary(k, positions_BS, self.theta)
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if allowed_BSS is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_BSS[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a dense FFN, or a MoE layer's shared experts as one."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores every routed expert of a layer, in float32 (the logits' matmul in the input's dtype
    with `router_dtype` "compute"). One router may serve several layers (PathMoE). NormRouter:
    s = sigma * c * relu(z / (||z|| + eps)), c stored with the weights."""

    def __init__(self, config: MoESweepConfig) -> None:
        super().__init__()
        num_experts = sum(s["num_experts"] for s in config.expert_sets)
        self.scoring, self.eps = config.router_scoring, config.router_norm_eps
        self.matmul_dtype = None if config.router_dtype == "compute" else torch.float32
        self.weight = nn.Parameter(torch.randn(num_experts, config.hidden_size) * config.initializer_range)
        if self.scoring == "norm":
            self.sigma = nn.Parameter(torch.ones(()))
            self.register_buffer("norm_const", torch.ones(()))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        dtype = self.matmul_dtype or x_TD.dtype
        logits_TN = (x_TD.to(dtype) @ self.weight.to(dtype).t()).float()
        if self.scoring == "softmax":
            return logits_TN.softmax(dim=-1)
        if self.scoring == "sigmoid":
            return logits_TN.sigmoid()
        unit = logits_TN / (logits_TN.norm(dim=-1, keepdim=True) + self.eps)
        return self.sigma.float() * self.norm_const * F.relu(unit)


class ExpertBank(nn.Module):
    """Experts of one width, stacked."""

    def __init__(self, num_experts: int, d_model: int, width: int, std: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.randn(num_experts, width, d_model) * std)
        self.up_proj = nn.Parameter(torch.randn(num_experts, width, d_model) * std)
        self.down_proj = nn.Parameter(torch.randn(num_experts, d_model, width) * std)

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor, keep_TK: torch.Tensor
    ) -> torch.Tensor:
        """sum over kept slots k of gate[t, k] * expert_{ids[t, k]}(x[t]); a loop over experts."""
        out = torch.zeros_like(x_TD)
        for e in range(self.num_experts):
            tok, slot = torch.nonzero((ids_TK == e) & keep_TK, as_tuple=True)
            if tok.numel() == 0:
                continue
            h = x_TD[tok]
            y = F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
            out.index_add_(0, tok, (y * gates_TK[tok, slot, None]).to(out.dtype))
        return out


class ExpertPool(nn.Module):
    """One bank per expert set; with overflow to a default expert each bank holds one more, last,
    of the set's width. Used by one MoE layer, or by several (UniPool)."""

    def __init__(self, config: MoESweepConfig) -> None:
        super().__init__()
        extra = int(config.overflow == "default_expert")
        self.sets = nn.ModuleList(
            ExpertBank(s["num_experts"] + extra, config.hidden_size, s["width"], config.initializer_range)
            for s in config.expert_sets
        )


class MoEFeedForward(nn.Module):
    """One MoE FFN: route with the layer's router, compute the chosen experts of the layer's pool,
    add the shared experts. Router and pool are handed in, since layers may share them."""

    def __init__(self, config: MoESweepConfig, pool: int, router: int) -> None:
        super().__init__()
        self.pool, self.router = pool, router
        self.sets = []  # (first router column, num_experts, top_k, first slot) of each expert set
        offset = slot = 0
        for s in config.expert_sets:
            self.sets.append((offset, s["num_experts"], s["top_k"], slot))
            offset, slot = offset + s["num_experts"], slot + s["top_k"]
        self.renormalize = config.router_renormalize
        self.capacity_factor, self.overflow = config.capacity_factor, config.overflow
        shared = config.shared_expert_size
        self.shared_expert = SwiGLU(config.hidden_size, shared) if shared else None
        if config.selection_bias:
            self.register_buffer("selection_bias", torch.zeros(offset))
        else:
            self.selection_bias = None

    def forward(self, x_BSD: torch.Tensor, router: Router, pool: ExpertPool) -> torch.Tensor:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        ids_TK, gates_TK = self.route(router(x_TD))
        y_TD = torch.zeros_like(x_TD) if self.shared_expert is None else self.shared_expert(x_TD)
        for (offset, num_experts, top_k, slot), bank in zip(self.sets, pool.sets):
            cols = slice(slot, slot + top_k)
            local_TK = ids_TK[:, cols] - offset
            keep_TK = self.within_capacity(local_TK, num_experts, top_k)
            if self.overflow == "default_expert":  # the pairs over capacity go to the default expert
                local_TK, keep_TK = local_TK.masked_fill(~keep_TK, num_experts), torch.ones_like(keep_TK)
            y_TD = y_TD + bank(x_TD, local_TK, gates_TK[:, cols], keep_TK)
        return y_TD.view_as(x_BSD)

    def route(self, scores_TN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each set's top-k on score + selection bias; the gates are the unbiased scores, divided
        by their sum over all chosen experts with `router_renormalize`."""
        choose = scores_TN if self.selection_bias is None else scores_TN + self.selection_bias
        ids_TK = torch.cat([choose[:, o : o + n].topk(k, dim=-1).indices + o for o, n, k, _ in self.sets], dim=-1)
        gates_TK = scores_TN.gather(-1, ids_TK)
        if self.renormalize:
            gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return ids_TK, gates_TK

    def within_capacity(self, local_TK: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
        """Bool (T, K): whether each pair is among the first C of its expert, C = ceil(CF * T * k / n)
        in exact arithmetic. Pairs queue slot-major: every token's first choice before any second
        choice, tokens in batch order within a slot."""
        if self.capacity_factor is None:
            return torch.ones_like(local_TK, dtype=torch.bool)
        num_tokens = local_TK.shape[0]
        ratio = Fraction(str(self.capacity_factor))
        cap = -(-ratio.numerator * num_tokens * top_k // (ratio.denominator * num_experts))
        ids_P = local_TK.t().reshape(-1)
        rank_P = (F.one_hot(ids_P, num_experts).cumsum(dim=0) - 1).gather(1, ids_P[:, None]).squeeze(1)
        return (rank_P < cap).view(top_k, num_tokens).t()


class DecoderLayer(nn.Module):
    def __init__(self, config: MoESweepConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer in config.moe_layers:
            i = config.moe_layers.index(layer)
            self.mlp = MoEFeedForward(config, pool=config.layer_pools[i], router=config.layer_routers[i])
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x_BSD, positions_BS, allowed_BSS, routers: nn.ModuleList, pools: nn.ModuleList) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), positions_BS, allowed_BSS)
        h_BSD = self.post_attention_layernorm(x_BSD)
        if isinstance(self.mlp, MoEFeedForward):
            return x_BSD + self.mlp(h_BSD, routers[self.mlp.router], pools[self.mlp.pool])
        return x_BSD + self.mlp(h_BSD)


class MoESweepPreTrainedModel(PreTrainedModel):
    config_class = MoESweepConfig
    base_model_prefix = "model"


class MoESweepModel(MoESweepPreTrainedModel):
    """The decoder without its output head; routers and pools live here, shared by the layers."""

    def __init__(self, config: MoESweepConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.routers = nn.ModuleList(Router(config) for _ in range(config.num_routers))
        self.pools = nn.ModuleList(ExpertPool(config) for _ in range(config.num_pools))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutput:
        """`attention_mask` (B, S), 0 at padding: padded keys are hidden and positions count real
        tokens only (left padding for batched generation). Padded tokens still pass through the
        experts and, with a capacity, take their places in the queues."""
        b, s = input_ids.shape
        positions_BS = torch.arange(s, device=input_ids.device).expand(b, s)
        allowed_BSS = None
        if attention_mask is not None and not bool(attention_mask.all()):
            real_BS = attention_mask.bool()
            positions_BS = (real_BS.long().cumsum(dim=-1) - 1).clamp_min(0)
            causal_SS = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).tril()
            # A padded query may see no real key: it sees itself, so its (unused) row stays finite.
            allowed_BSS = (causal_SS & real_BS[:, None, :]) | torch.eye(s, dtype=torch.bool, device=input_ids.device)
        x_BSD = self.embed_tokens(input_ids)
        for layer in self.layers:
            x_BSD = layer(x_BSD, positions_BS, allowed_BSS, self.routers, self.pools)
        return BaseModelOutput(last_hidden_state=self.norm(x_BSD))


class MoESweepForCausalLM(MoESweepPreTrainedModel, GenerationMixin):
    """The decoder and its head; with tied embeddings the head is the embedding matrix itself."""

    def __init__(self, config: MoESweepConfig) -> None:
        super().__init__(config)
        self.model = MoESweepModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, S, V); with `labels`, the mean next-token cross-entropy (labels are shifted
        here, -100 ignored). Cache arguments from `generate` are ignored: there is no cache."""
        h_BSD = self.model(input_ids, attention_mask).last_hidden_state
        logits = F.linear(h_BSD, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h_BSD)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """The whole sequence at every step (no cache; see the module docstring)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """transformers 5: build no cache for `generate`; the forward would not fill it."""
        return False

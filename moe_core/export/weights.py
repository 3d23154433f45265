"""moe_core weights as Hugging Face state dicts: Llama, Mixtral, or the moe_sweep remote code.

Conversions, the same for every target:
- RoPE layout: moe_core rotates interleaved pairs (x0, x1), (x2, x3), ...; transformers rotates
  halves (x_i, x_{i+E/2}) (`rotate_half`). Each head's rows of the q and k projections are
  reordered evens-then-odds, which turns one into the other; attention scores are dot products
  over a head's components, so a permutation applied to both q and k leaves them unchanged
  (v and the output projection are untouched).
- Fused projections split: attention `wkv` into k and v; SwiGLU `w13` into gate (first half) and
  up (second half).
- Expert banks: moe_core stores x @ W matrices (E, D, 2F) and (E, F, D); transformers stores
  `nn.Linear`-style (out, in) matrices, so each is transposed.
- Tied embeddings: no head tensor is written (the config says to tie).

Every tensor is copied to CPU and made contiguous: safetensors refuses tensors sharing storage,
which the split halves of a fused matrix would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_core.config import ModelConfig
from moe_core.layers import Attention, SwiGLU
from moe_core.model import MoETransformer
from moe_core.moe.experts import ExpertBank

Tensors = dict[str, torch.Tensor]
FFNTensors = Callable[[int, nn.Module], Tensors]  # (layer index, block) -> that layer's FFN tensors


def _own(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def half_split_rows(w_OD: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's output rows from interleaved-pair to half-split RoPE layout."""
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return w_OD.view(n_heads, head_dim, -1)[:, order].reshape(n_heads * head_dim, -1)


def _attention(prefix: str, attn: Attention, cfg: ModelConfig) -> Tensors:
    kv = cfg.kv_heads * cfg.head_dim
    k, v = attn.wkv.weight[:kv], attn.wkv.weight[kv:]
    return {
        f"{prefix}.q_proj.weight": half_split_rows(attn.wq.weight, cfg.n_heads, cfg.head_dim),
        f"{prefix}.k_proj.weight": half_split_rows(k, cfg.kv_heads, cfg.head_dim),
        f"{prefix}.v_proj.weight": v,
        f"{prefix}.o_proj.weight": attn.wo.weight,
    }


def _swiglu(prefix: str, ffn: SwiGLU) -> Tensors:
    gate, up = ffn.w13.weight.chunk(2, dim=0)
    return {
        f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up, f"{prefix}.down_proj.weight": ffn.w2.weight,
    }


def _bank_linear(bank: ExpertBank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate (E, F, D), up (E, F, D), down (E, D, F) in `nn.Linear` layout."""
    gate, up = bank.w13_EDF2.chunk(2, dim=-1)
    return gate.transpose(1, 2), up.transpose(1, 2), bank.w2_EFD.transpose(1, 2)


def _shared_parts(model: MoETransformer, ffn_tensors: FFNTensors) -> Tensors:
    """Embeddings, attention, norms and head, which every target names alike (Llama's names),
    plus each layer's FFN tensors from `ffn_tensors`."""
    cfg = model.cfg
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}"
        out[f"{prefix}.input_layernorm.weight"] = block.attn_norm.weight
        out[f"{prefix}.post_attention_layernorm.weight"] = block.ffn_norm.weight
        out.update(_attention(f"{prefix}.self_attn", block.attn, cfg))
        out.update(ffn_tensors(i, block))
    if model.head is not None:
        out["lm_head.weight"] = model.head.weight
    return {k: _own(v) for k, v in out.items()}


def llama_tensors(model: MoETransformer) -> Tensors:
    return _shared_parts(model, lambda i, block: _swiglu(f"model.layers.{i}.mlp", block.ffn))


def mixtral_tensors(model: MoETransformer) -> Tensors:
    """Mixtral's checkpoint layout (`block_sparse_moe.experts.{e}.w1/w2/w3`, as on the Hub), which
    transformers 5 fuses into its stacked `gate_up_proj` / `down_proj` when loading and older
    readers take as it is."""

    def ffn(i: int, block: nn.Module) -> Tensors:
        prefix = f"model.layers.{i}.block_sparse_moe"
        gate, up, down = _bank_linear(model.pools[block.ffn.pool].sets[0])
        out = {f"{prefix}.gate.weight": model.routers[block.ffn.router].weight_ND}
        for e in range(gate.shape[0]):
            out[f"{prefix}.experts.{e}.w1.weight"] = gate[e]
            out[f"{prefix}.experts.{e}.w3.weight"] = up[e]
            out[f"{prefix}.experts.{e}.w2.weight"] = down[e]
        return out

    return _shared_parts(model, ffn)


def moe_sweep_tensors(model: MoETransformer) -> Tensors:
    """The remote-code layout (`modeling_moe_sweep.py`): routers and pools once each under
    `model.routers` / `model.pools`, however many layers use them."""
    selection_bias = model.cfg.moe.balance.bias_rate > 0

    def ffn(i: int, block: nn.Module) -> Tensors:
        prefix = f"model.layers.{i}.mlp"
        if block.ffn not in model.moe_layers:
            return _swiglu(prefix, block.ffn)
        out = _swiglu(f"{prefix}.shared_expert", block.ffn.shared) if block.ffn.shared is not None else {}
        if selection_bias:
            out[f"{prefix}.selection_bias"] = block.ffn.bias_N
        return out

    out = _shared_parts(model, ffn)
    for r, router in enumerate(model.routers):
        out[f"model.routers.{r}.weight"] = router.weight_ND
        if router.cfg.scoring == "norm":
            out[f"model.routers.{r}.sigma"] = router.sigma
            out[f"model.routers.{r}.norm_const"] = router.norm_const
    for p, pool in enumerate(model.pools):
        for s, bank in enumerate(pool.sets):
            for name, t in zip(("gate_proj", "up_proj", "down_proj"), _bank_linear(bank)):
                out[f"model.pools.{p}.sets.{s}.{name}"] = t
    return {k: _own(v) for k, v in out.items()}

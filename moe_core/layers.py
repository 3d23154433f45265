"""The dense building blocks of the decoder: rotary embedding, attention, SwiGLU FFN.

Shape legend: B batch, S sequence, D model dim, H heads, K kv heads, E head dim, F FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.config import ModelConfig


class Rotary(nn.Module):
    """RoPE (Su et al. 2021) with a configurable base; cos/sin cached for seq_len positions."""

    def __init__(self, head_dim: int, seq_len: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
        # Not persistent: derived from the config, so checkpoints stay small and portable.
        self.register_buffer("cos_SE", angles.cos().float(), persistent=False)
        self.register_buffer("sin_SE", angles.sin().float(), persistent=False)

    def forward(self, x_BHSE: torch.Tensor) -> torch.Tensor:
        seq = x_BHSE.shape[-2]
        if seq > self.cos_SE.shape[0]:
            raise ValueError(f"sequence length {seq} exceeds the model's seq_len {self.cos_SE.shape[0]}")
        cos, sin = self.cos_SE[:seq].to(x_BHSE.dtype), self.sin_SE[:seq].to(x_BHSE.dtype)
        x1, x2 = x_BHSE[..., 0::2], x_BHSE[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class Attention(nn.Module):
    """Causal grouped-query attention through `scaled_dot_product_attention`; no biases."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.rotary = rotary

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q_BHSE = self.wq(x_BSD).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.wkv(x_BSD).view(b, s, 2, self.n_kv, self.head_dim).unbind(2)
        k_BKSE, v_BKSE = k.transpose(1, 2), v.transpose(1, 2)
        q_BHSE, k_BKSE = self.rotary(q_BHSE), self.rotary(k_BKSE)
        out = F.scaled_dot_product_attention(
            q_BHSE, k_BKSE, v_BKSE, is_causal=True, enable_gqa=self.n_kv != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """SwiGLU FFN (Shazeer 2020): w2(silu(x w1) * (x w3)). Gate and up projections are fused."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.w13 = nn.Linear(d_model, 2 * width, bias=False)
        self.w2 = nn.Linear(width, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

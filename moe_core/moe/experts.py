"""Routed SwiGLU experts and the two ways of computing them.

Shape legend: T tokens, D model dim, E experts, F expert width, K slots, P kept (token, slot) pairs.

- `reference`: a loop over experts that gathers each expert's tokens. Obviously correct; the
  oracle every fast path is tested against.
- `grouped`: pairs sorted by expert once, then one grouped GEMM per projection
  (`torch._grouped_mm` where it is exact and fast for the device and dtype, else one matmul per
  expert over the sorted splits), gates applied to the second projection's output, and a
  deterministic combine (no float atomics).
A Triton kernel (separate issue) plugs in as a third backend with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.moe.dispatch import Dispatch, combine


class ExpertBank(nn.Module):
    """E experts of one width: fused gate|up projection w13 (E, D, 2F) and down w2 (E, F, D)."""

    def __init__(self, num_experts: int, d_model: int, width: int) -> None:
        super().__init__()
        self.num_experts, self.width = num_experts, width
        self.w13_EDF2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * width))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, width, d_model))


def experts_reference(
    bank: ExpertBank, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor, keep_TK: torch.Tensor
) -> torch.Tensor:
    """y[t] = sum over kept slots k of gate[t, k] * expert_{ids[t, k]}(x[t]); a plain loop."""
    out = torch.zeros_like(x_TD)
    for e in range(bank.num_experts):
        tok, slot = torch.nonzero((ids_TK == e) & keep_TK, as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = (x_TD[tok] @ bank.w13_EDF2[e]).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ bank.w2_EFD[e]
        out = out.index_add(0, tok, (y * gates_TK[tok, slot, None]).to(out.dtype))
    return out


def _grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Where `torch._grouped_mm` is both correct and fast (checked against the per-expert loop).

    Both need rows aligned to 16 bytes. CPU: float32 only (bfloat16 runs but is ~30x slower than
    the loop). CUDA: bfloat16 on sm90+.
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype == torch.float32
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def grouped_matmul(x_PD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (counts_E rows each, in order) times that expert's matrix."""
    if _grouped_mm_usable(x_PD, w_EDF):
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_PD, w_EDF, offs=offs)
    splits = x_PD.split(counts_E.tolist())
    return torch.cat([xs @ w_EDF[e] for e, xs in enumerate(splits)], dim=0)


def experts_grouped(
    bank: ExpertBank, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor
) -> torch.Tensor:
    """The fast path: gather once, two grouped GEMMs, gate, deterministic combine."""
    num_tokens = x_TD.shape[0]
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    w13, w2 = bank.w13_EDF2.to(dtype), bank.w2_EFD.to(dtype)
    x_PD = x_TD.to(dtype).index_select(0, dispatch.token_P)
    gate, up = grouped_matmul(x_PD, w13, dispatch.kept_E).chunk(2, dim=-1)
    # Gating the F-wide hidden instead of the D-wide output is the same linear map and touches
    # F/D as much memory: for fine-grained experts F << D.
    gates_P = gates_TK.t().reshape(-1).index_select(0, dispatch.pair_P)
    h_PF = F.silu(gate) * up * gates_P[:, None].to(dtype)
    return combine(grouped_matmul(h_PF, w2, dispatch.kept_E), dispatch, num_tokens)

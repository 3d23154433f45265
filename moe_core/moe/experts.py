"""Routed SwiGLU experts and the two ways of computing them.

Shape legend: T tokens, D model dim, E experts, F expert width, K slots, P kept (token, slot) pairs.

- `reference`: a loop over experts that gathers each expert's tokens. Obviously correct; the
  oracle every fast path is tested against.
- `grouped`: pairs sorted by expert once, then one grouped GEMM per projection
  (`torch._grouped_mm` where it is exact and fast for the device and dtype, else one matmul per
  expert over the sorted splits), gates applied to the hidden activation, and a deterministic
  combine (no float atomics). On CPU the same computation streams chunks of experts through the
  cache with a hand-written backward (`streamed.py`).
- `triton`: Triton kernels (`triton_experts.py`): scattered-to-grouped matmuls reading tokens
  in place, the gate fused into the down projection, hand-written backward. CUDA, or Triton's
  CPU interpreter (TRITON_INTERPRET=1) for the parity tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.moe.dispatch import Dispatch, combine
from moe_core.moe.grouped_gemm import grouped_matmul
from moe_core.moe.streamed import experts_streamed


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


STREAM_ON_CPU = True  # tests turn this off to run the gathered path on CPU


def experts_grouped(
    bank: ExpertBank, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor, streamed: bool | None = None
) -> torch.Tensor:
    """The fast path. On CPU it streams expert chunks through the cache (`streamed.py`);
    elsewhere it gathers once, runs two grouped GEMMs and combines deterministically."""
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):  # we cast by hand: autocast skips these ops
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    x_TD, w13, w2 = x_TD.to(dtype), bank.w13_EDF2.to(dtype), bank.w2_EFD.to(dtype)
    gates_P = gates_TK.t().reshape(-1).index_select(0, dispatch.pair_P).to(dtype)
    if streamed is None:
        streamed = STREAM_ON_CPU and x_TD.device.type == "cpu"
    if streamed:
        with torch.autocast(x_TD.device.type, enabled=False):
            return experts_streamed(x_TD, gates_P, w13, w2, dispatch.token_P, dispatch.kept_E)
    num_tokens = x_TD.shape[0]
    x_PD = x_TD.index_select(0, dispatch.token_P)
    gate, up = grouped_matmul(x_PD, w13, dispatch.kept_E).chunk(2, dim=-1)
    # Gating the F-wide hidden instead of the D-wide output is the same linear map and touches
    # F/D as much memory: for fine-grained experts F << D.
    h_PF = F.silu(gate) * up * gates_P[:, None]
    return combine(grouped_matmul(h_PF, w2, dispatch.kept_E), dispatch, num_tokens)


def experts_triton(bank: ExpertBank, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """The Triton backend, with the same casting rules as `experts_grouped`."""
    import os

    from moe_core.errors import ConfigError

    if x_TD.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("moe.backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    try:
        from moe_core.moe.triton_experts import experts_triton as run
    except ImportError:
        raise ConfigError("moe.backend 'triton' needs the triton package (pip install triton)") from None
    dtype = x_TD.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        dtype = torch.get_autocast_dtype(x_TD.device.type)
    gates_P = gates_TK.t().reshape(-1).index_select(0, dispatch.pair_P).to(dtype)
    with torch.autocast(x_TD.device.type, enabled=False):
        return run(x_TD.to(dtype), bank.w13_EDF2.to(dtype), bank.w2_EFD.to(dtype), dispatch, gates_P)

"""Routed SwiGLU experts and the ways of computing them (`moe.backend`).

Shape legend: T tokens, D model dim, E experts, F expert width, K slots, P = K * T (token, slot)
pairs, sorted by expert (`dispatch.py`).

- `reference`: a loop over experts that gathers each expert's tokens. Obviously correct; the
  oracle every fast path is tested against.
- `grouped`: rows gathered once in expert order, one grouped GEMM per projection
  (`torch._grouped_mm` where it is exact and fast for the device and dtype), the gate applied to
  the hidden activation, and a deterministic combine; gather and combine have atomic-free
  backward passes. No host synchronisation and routing-independent shapes: the GPU path, and the
  one `torch.compile` traces whole.
- `streamed`: the CPU path. The same computation streams chunks of experts through the cache
  with a hand-written backward (`streamed.py`); it reads the per-expert counts on the host (free
  on a CPU).
- `triton`: Triton kernels (`triton_experts.py`). CUDA, or Triton's CPU interpreter
  (TRITON_INTERPRET=1) for the parity tests.
- `auto`: `streamed` on CPU in eager mode, `grouped` everywhere else (GPUs, and under
  torch.compile, which cannot trace the streamed path's host reads).

Every backend takes `Experts`: a bank (its parameters, cast here to the compute dtype) or the
`ExpertWeights` a `BankCast` made once per forward for all the layers that share the bank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.errors import ConfigError
from moe_core.moe.dispatch import Dispatch, combine, gather_rows
from moe_core.moe.grouped_gemm import grouped_matmul
from moe_core.moe.streamed import experts_streamed
from moe_core.moe.swiglu import gated_swiglu


class ExpertBank(nn.Module):
    """E experts of one width: fused gate|up projection w13 (E, D, 2F) and down w2 (E, F, D)."""

    def __init__(self, num_experts: int, d_model: int, width: int) -> None:
        super().__init__()
        self.num_experts, self.width = num_experts, width
        self.w13_EDF2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * width))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, width, d_model))


@dataclass(frozen=True)
class ExpertWeights:
    """A bank's weights as one layer computes with them (see `BankCast`)."""

    w13_EDF2: torch.Tensor
    w2_EFD: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.w13_EDF2.shape[0]


Experts = ExpertBank | ExpertWeights


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


class BankCast:
    """A bank's weights cast to the compute dtype once per forward, for every layer that uses
    the bank. Under autocast a UniPool pool would otherwise be cast, and the copy saved for
    backward, by each of its layers: L copies of the pool instead of one."""

    def __init__(self, bank: ExpertBank, dtype: torch.dtype) -> None:
        self.bank = bank
        w13, w2 = bank.w13_EDF2, bank.w2_EFD
        self.cast = None if w13.dtype == dtype else (w13.detach().to(dtype), w2.detach().to(dtype))

    def use(self) -> ExpertWeights:
        """The weights for one layer: the parameters themselves when no cast is needed."""
        w13, w2 = self.bank.w13_EDF2, self.bank.w2_EFD
        if self.cast is None:
            return ExpertWeights(w13, w2)
        return ExpertWeights(_UseCast.apply(w13, self.cast[0]), _UseCast.apply(w2, self.cast[1]))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on (its dtype rules skip the ops
    the fast paths use, so they cast by hand), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def experts_reference(
    bank: Experts, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor, keep_TK: torch.Tensor
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend `auto` stands for on this device, in this mode (see module docstring)."""
    if backend != "auto":
        return backend
    if device.type == "cpu" and not torch.compiler.is_compiling():
        return "streamed"
    return "grouped"


def cast_for_experts(
    x_TD: torch.Tensor, bank: Experts, dispatch: Dispatch, gates_TK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, the weights and each row's gate (`Dispatch.pair_gates`) in the compute dtype
    (`compute_dtype`); weights a `BankCast` made are in it already and are not copied."""
    dtype = compute_dtype(x_TD)
    gates_P = dispatch.pair_gates(gates_TK).to(dtype)
    return x_TD.to(dtype), bank.w13_EDF2.to(dtype), bank.w2_EFD.to(dtype), gates_P


def experts_grouped(bank: Experts, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """Gather rows in expert order, two grouped GEMMs, combine. Sync-free, static shapes."""
    x_TD, w13, w2, gates_P = cast_for_experts(x_TD, bank, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        h_P2F = grouped_matmul(gather_rows(x_TD, dispatch), w13, dispatch.offsets_E)
        # Gating the F-wide hidden instead of the D-wide output is the same linear map and
        # touches F/D as much memory: for fine-grained experts F << D.
        y_PD = grouped_matmul(gated_swiglu(h_P2F, gates_P), w2, dispatch.offsets_E)
        return combine(y_PD, dispatch)


def experts_cpu_streamed(bank: Experts, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """The CPU path: expert chunks streamed through the cache (`streamed.py`)."""
    x_TD, w13, w2, gates_P = cast_for_experts(x_TD, bank, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        return experts_streamed(x_TD, gates_P, w13, w2, dispatch)


def experts_triton(bank: Experts, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """The Triton backend, with the same casting rules as `experts_grouped`."""
    if x_TD.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("moe.backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    try:
        from moe_core.moe.triton_experts import experts_triton as run
    except ImportError:
        raise ConfigError("moe.backend 'triton' needs the triton package (pip install triton)") from None
    x_TD, w13, w2, gates_P = cast_for_experts(x_TD, bank, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        return run(x_TD, w13, w2, dispatch, gates_P)


BACKENDS = {"grouped": experts_grouped, "streamed": experts_cpu_streamed, "triton": experts_triton}

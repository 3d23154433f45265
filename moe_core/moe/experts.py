"""Routed SwiGLU experts and the ways of computing them (`moe.backend`).

Shape legend: T tokens, D model dim, E experts, F expert width, K slots, P = K * T (token, slot)
pairs, sorted by expert (`dispatch.py`).

- `reference`: a loop over experts that gathers each expert's tokens. Obviously correct; the
  oracle every fast path is tested against.
- `grouped`: rows gathered once in expert order, one grouped GEMM per projection
  (`torch._grouped_mm` where it is exact and fast for the device and dtype), the gate applied to
  the hidden activation, and a deterministic combine; gather and combine have atomic-free
  backward passes. No host synchronisation and routing-independent shapes: the GPU path, and the
  one `torch.compile` traces whole. On CUDA in eager mode fused Triton kernels stand in for its
  SwiGLU and combine (`fused_kernels_available`, decided here and nowhere else).
- `streamed`: the CPU path. The same computation streams chunks of experts through the cache
  with a hand-written backward (`streamed.py`); it reads the per-expert counts on the host (free
  on a CPU).
- `triton`: Triton kernels (`triton_experts.py`). CUDA, or Triton's CPU interpreter
  (TRITON_INTERPRET=1) for the parity tests.
- `auto`: `streamed` on CPU in eager mode, `grouped` everywhere else (GPUs, and under
  torch.compile, which cannot trace the streamed path's host reads).

Every backend has one signature, `(weights, x_TD, dispatch, gates_TK) -> y_TD`: the weights
already in the compute dtype (`parts.MoEParts.weights` casts them once per forward), x in its own
dtype (the fast paths cast it to the weights'; the reference leaves autocast to do it), the
dispatch of the expert set and each (token, slot)'s gate. `backend_for` picks one.

The SwiGLU of the routed experts on pre-activations h = x @ [w1 | w3], with the per-pair gate,
and its backward are here too (`gated_swiglu`): one copy, shared by every backend that needs it
(the CPU `streamed` path's eager backward writes the same formulas into place:
`streamed._swiglu_backward`). R rows (pairs); h_R2F holds [gate | up] side by side.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.errors import ConfigError
from moe_core.moe.dispatch import Dispatch, combine, gather_rows
from moe_core.moe.grouped_gemm import grouped_matmul
from moe_core.moe.streamed import experts_streamed


@dataclass(frozen=True)
class ExpertWeights:
    """The weights one layer computes an expert set with: a bank's parameters, or their copy in
    the compute dtype (`parts.PoolCast`)."""

    w13_EDF2: torch.Tensor
    w2_EFD: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.w13_EDF2.shape[0]


class ExpertBank(nn.Module):
    """E experts of one width: fused gate|up projection w13 (E, D, 2F) and down w2 (E, F, D)."""

    def __init__(self, num_experts: int, d_model: int, width: int) -> None:
        super().__init__()
        self.num_experts, self.width = num_experts, width
        self.w13_EDF2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * width))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, width, d_model))


Backend = Callable[[ExpertWeights, torch.Tensor, Dispatch, torch.Tensor], torch.Tensor]


def backend_for(backend: str, device: torch.device) -> Backend:
    """The expert computation `moe.backend` names, `auto` resolved for this device and mode (see
    the module docstring)."""
    if backend == "auto":
        backend = "streamed" if device.type == "cpu" and not torch.compiler.is_compiling() else "grouped"
    return BACKENDS[backend]


def experts_reference(weights: ExpertWeights, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over kept slots k of gate[t, k] * expert_{ids[t, k]}(x[t]); a plain loop."""
    out = torch.zeros_like(x_TD)
    computed_TK = dispatch.keep_mask_TK()
    for e in range(weights.num_experts):
        tok, slot = torch.nonzero((dispatch.ids_TK == e) & computed_TK, as_tuple=True)
        if tok.numel() == 0:
            continue
        gate, up = (x_TD[tok] @ weights.w13_EDF2[e]).chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ weights.w2_EFD[e]
        out = out.index_add(0, tok, (y * gates_TK[tok, slot, None]).to(out.dtype))
    return out


def experts_grouped(weights: ExpertWeights, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """Gather rows in expert order, two grouped GEMMs, combine. Sync-free, static shapes."""
    fused = fused_kernels_available(weights.w13_EDF2)  # on the compute dtype, as x will be
    x_TD, gates_P = _operands(weights, x_TD, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        h_P2F = grouped_matmul(gather_rows(x_TD, dispatch, fused), weights.w13_EDF2, dispatch.offsets_E)
        # Gating the F-wide hidden instead of the D-wide output is the same linear map and
        # touches F/D as much memory: for fine-grained experts F << D.
        y_PD = grouped_matmul(gated_swiglu(h_P2F, gates_P, fused), weights.w2_EFD, dispatch.offsets_E)
        return combine(y_PD, dispatch, fused)


def experts_cpu_streamed(weights: ExpertWeights, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """The CPU path: expert chunks streamed through the cache (`streamed.py`)."""
    x_TD, gates_P = _operands(weights, x_TD, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        return experts_streamed(x_TD, gates_P, weights.w13_EDF2, weights.w2_EFD, dispatch)


def experts_triton(weights: ExpertWeights, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> torch.Tensor:
    """The Triton backend (`triton_experts.py`)."""
    if x_TD.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("moe.backend 'triton' needs a CUDA GPU (or TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    try:
        from moe_core.moe.triton_experts import experts_triton as run
    except ImportError:
        raise ConfigError("moe.backend 'triton' needs the triton package (pip install triton)") from None
    x_TD, gates_P = _operands(weights, x_TD, dispatch, gates_TK)
    with torch.autocast(x_TD.device.type, enabled=False):
        return run(x_TD, weights.w13_EDF2, weights.w2_EFD, dispatch, gates_P)


# -- the gated SwiGLU ------------------------------------------------------------------------------
def swiglu_activation(h_R2F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """act = silu(gate) * up, and sigma(gate), which the backward needs again."""
    width = h_R2F.shape[-1] // 2
    gate, up = h_R2F[:, :width], h_R2F[:, width:]
    sig = torch.sigmoid(gate)
    return gate * sig * up, sig


def swiglu_backward(h_R2F: torch.Tensor, d_act_RF: torch.Tensor, sig_RF: torch.Tensor) -> torch.Tensor:
    """d h for act = silu(gate) * up, given d act and sig = sigma(gate) (from `swiglu_activation`).
    silu'(z) = sigma(z) * (1 + z * (1 - sigma(z))). Both halves are computed in place in one
    (R, 2F) tensor: with a temporary per operation and a `cat` (as before) this took twice as
    long on CPU (fresh large buffers fault their pages in)."""
    width = d_act_RF.shape[-1]
    gate, up = h_R2F[:, :width], h_R2F[:, width:]
    acc = torch.promote_types(h_R2F.dtype, d_act_RF.dtype)  # as the out-of-place products would be
    dh_R2F = h_R2F.new_empty(h_R2F.shape, dtype=acc)
    d_gate, d_up = dh_R2F[:, :width], dh_R2F[:, width:]
    # copy_ then in place, not `out=` slices: dynamo refuses non-contiguous `out=` tensors.
    d_up.copy_(d_act_RF).mul_(gate).mul_(sig_RF)
    silu_grad = torch.rsub(sig_RF.to(acc), 1).mul_(gate).add_(1).mul_(sig_RF)
    d_gate.copy_(d_act_RF).mul_(up).mul_(silu_grad)
    return dh_R2F


class _GatedSwiGLU(torch.autograd.Function):
    """a = silu(gate) * up * g[:, None]. Saves only h and g (autograd would keep three more
    (R, F) tensors); torch.compile fuses the elementwise work of both passes."""

    @staticmethod
    def forward(ctx, h_R2F: torch.Tensor, gates_R: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h_R2F, gates_R)
        width = h_R2F.shape[-1] // 2
        return F.silu(h_R2F[:, :width]) * h_R2F[:, width:] * gates_R[:, None]

    @staticmethod
    def backward(ctx, d_a_RF: torch.Tensor):
        h_R2F, gates_R = ctx.saved_tensors
        act, sig = swiglu_activation(h_R2F)
        acc = torch.promote_types(gates_R.dtype, torch.float32)  # at least float32 for the sum over F
        d_gates = (d_a_RF * act).sum(dim=-1, dtype=acc).to(gates_R.dtype)
        return swiglu_backward(h_R2F, d_a_RF * gates_R[:, None], sig), d_gates


class _FusedGatedSwiGLU(torch.autograd.Function):
    """The same map, one Triton kernel per pass (`triton_swiglu.py`)."""

    @staticmethod
    def forward(ctx, h_R2F: torch.Tensor, gates_R: torch.Tensor) -> torch.Tensor:
        from moe_core.moe.triton_swiglu import swiglu_forward

        ctx.save_for_backward(h_R2F, gates_R)
        return swiglu_forward(h_R2F, gates_R)

    @staticmethod
    def backward(ctx, d_a_RF: torch.Tensor):
        from moe_core.moe.triton_swiglu import swiglu_backward_fused

        h_R2F, gates_R = ctx.saved_tensors
        return swiglu_backward_fused(h_R2F, gates_R, d_a_RF)


def gated_swiglu(h_R2F: torch.Tensor, gates_R: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] * gates[:, None], with a hand-written backward; `fused`: the
    Triton kernels (the grouped backend decides: `experts.fused_kernels_available`)."""
    return (_FusedGatedSwiGLU if fused else _GatedSwiGLU).apply(h_R2F, gates_R)


BACKENDS: dict[str, Backend] = {
    "reference": experts_reference, "grouped": experts_grouped, "streamed": experts_cpu_streamed, "triton": experts_triton,
}


def _operands(weights: ExpertWeights, x_TD: torch.Tensor, dispatch: Dispatch, gates_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and each row's gate (`Dispatch.pair_gates`) in the weights' dtype, the compute dtype
    (an `ExpertBank` passes for its weights: the tests hand one in)."""
    dtype = weights.w13_EDF2.dtype
    return x_TD.to(dtype), dispatch.pair_gates(gates_TK).to(dtype)


# The kernels compute in float32 registers: float64 keeps the plain ops, which compute in float64.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_kernels_available(t: torch.Tensor) -> bool:
    """Whether the fused Triton kernels (`triton_swiglu.py`, `triton_combine.py`) take tensors
    like `t`: CUDA, a dtype they compute exactly (`FUSED_DTYPES`), eager mode (under
    torch.compile inductor fuses the plain ops by itself, and cannot trace a raw Triton launch),
    Triton installed. The plain ops are the fast ones on CPU."""
    return (t.device.type == "cuda" and t.dtype in FUSED_DTYPES and not torch.compiler.is_compiling()
            and _triton_installed())


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None

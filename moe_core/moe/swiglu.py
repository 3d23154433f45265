"""SwiGLU of the routed experts on pre-activations h = x @ [w1 | w3], with the per-pair gate,
and its backward: one copy, shared by every expert backend that needs it (the CPU `streamed`
path's eager backward writes the same formulas into place: `streamed._swiglu_backward`).

Shape legend: R rows (pairs), F expert width; h_R2F holds [gate | up] side by side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.moe.fused import fused_kernels_available


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


def gated_swiglu(h_R2F: torch.Tensor, gates_R: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] * gates[:, None], with a hand-written backward; `fused` picks the
    Triton kernels (default: where `fused.fused_kernels_available`)."""
    if fused is None:
        fused = fused_kernels_available(h_R2F)
    return (_FusedGatedSwiGLU if fused else _GatedSwiGLU).apply(h_R2F, gates_R)

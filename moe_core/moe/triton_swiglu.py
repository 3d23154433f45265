"""Fused gated SwiGLU for the `grouped` backend on CUDA: one Triton kernel per pass.

Shape legend: R rows (pairs), F expert width; h_R2F holds [gate | up] side by side.

In eager mode the plain version (`swiglu.py`) is three elementwise kernels forward and about ten
backward, each a full trip through memory over (R, F) tensors; between the two grouped GEMMs that
was 1.5 ms of a 5.5 ms layer step on an H100 (g = 1/8). Here the forward reads h and the gates once
and writes a; the backward reads h, d a and the gates once and writes d h and the gates' gradient.
Arithmetic is float32 in registers whatever the storage dtype. The gates' gradient is a sum over
F: each program writes its tile's partial sum and a small (R, F / BLOCK_F) float32 buffer is summed
after, so the result does not depend on scheduling (no atomics).

Under torch.compile the plain version is used: inductor fuses it the same way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 16 x 64 tiles with 4 warps: compiled for sm_90 (bench/triton_sm90.py), the backward needs 32
# registers in bf16 with Triton 3.9 (36 with 3.6) and no spills (32 x 128 once spilled 80 bytes at
# 255 registers), leaving room for many warps per SM to hide memory latency in these memory-bound
# kernels.
BLOCK_R, BLOCK_F, NUM_WARPS = 16, 64, 4


@triton.jit
def _fwd_kernel(h_ptr, g_ptr, a_ptr, R, F, stride_h, stride_a, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + rows64 * stride_h + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)
    a = gate * tl.sigmoid(gate) * up * g[:, None]
    tl.store(a_ptr + rows64 * stride_a + cols[None, :], a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(h_ptr, g_ptr, da_ptr, dh_ptr, dg_ptr, R, F, stride_h, stride_da, stride_dh, stride_dg,
                BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    pid_f = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = rows < R
    mask = rmask[:, None] & (cols < F)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate = tl.load(h_ptr + rows64 * stride_h + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + rows64 * stride_h + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    da = tl.load(da_ptr + rows64 * stride_da + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(dg_ptr + rows.to(tl.int64) * stride_dg + pid_f, tl.sum(da * silu * up, axis=1), mask=rmask)
    dact = da * g[:, None]
    d_gate = dact * up * sig * (1.0 + gate * (1.0 - sig))
    out_ty = dh_ptr.dtype.element_ty
    tl.store(dh_ptr + rows64 * stride_dh + cols[None, :], d_gate.to(out_ty), mask=mask)
    tl.store(dh_ptr + rows64 * stride_dh + F + cols[None, :], (dact * silu).to(out_ty), mask=mask)


def swiglu_forward(h_R2F: torch.Tensor, gates_R: torch.Tensor) -> torch.Tensor:
    """silu(h[:, :F]) * h[:, F:] * gates[:, None]."""
    h_R2F, gates_R = h_R2F.contiguous(), gates_R.contiguous()
    rows, width = h_R2F.shape[0], h_R2F.shape[1] // 2
    a_RF = h_R2F.new_empty(rows, width)
    grid = (triton.cdiv(rows, BLOCK_R), triton.cdiv(width, BLOCK_F))
    _fwd_kernel[grid](h_R2F, gates_R, a_RF, rows, width, h_R2F.stride(0), a_RF.stride(0),
                      BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS)
    return a_RF


def swiglu_backward_fused(h_R2F: torch.Tensor, gates_R: torch.Tensor, d_a_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d h, d gates) of `swiglu_forward`, given d a."""
    h_R2F, gates_R, d_a_RF = h_R2F.contiguous(), gates_R.contiguous(), d_a_RF.contiguous()
    rows, width = h_R2F.shape[0], h_R2F.shape[1] // 2
    dh_R2F = torch.empty_like(h_R2F)
    tiles = triton.cdiv(width, BLOCK_F)
    dg_partial = torch.empty(rows, tiles, device=h_R2F.device, dtype=torch.float32)
    _bwd_kernel[(triton.cdiv(rows, BLOCK_R), tiles)](
        h_R2F, gates_R, d_a_RF, dh_R2F, dg_partial, rows, width,
        h_R2F.stride(0), d_a_RF.stride(0), dh_R2F.stride(0), dg_partial.stride(0),
        BLOCK_R=BLOCK_R, BLOCK_F=BLOCK_F, num_warps=NUM_WARPS,
    )
    return dh_R2F, dg_partial.sum(dim=1).to(gates_R.dtype)

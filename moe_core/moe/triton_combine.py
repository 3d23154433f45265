"""The combine as one Triton kernel: each token's sum over its K rows, read in place.

Shape legend: T tokens, K slots, P = K * T rows sorted by expert (`dispatch.py`), N row width.

out[t] = sum over slots k of rows[row_P[k * T + t]], the slots in order, in float32, rounded once
to the rows' dtype. The plain version (`dispatch._sum_pairs`) gathers every row back into
slot-major order, a (P, N) copy written and read again, and then sums over slots: three passes
over P x N where this reads each row once and writes each token once. At the H100 layer bench's
g = 1/8 point the (P, N) copy is 256 MB in bfloat16, and a layer step combines twice (its output,
and the gradient of its gathered input). No atomics: the result does not depend on scheduling.

Used by the `triton` backend, and by the `grouped` backend's combine on CUDA in eager mode (`experts.fused_kernels_available`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Memory bound: 16 tokens x 256 columns per program with 4 warps (compiled for sm_90 here: 56
# registers, no spills, no shared memory; bench/triton_sm90.py).
BLOCK_T, BLOCK_N, NUM_WARPS = 16, 256, 4


@triton.jit
def _combine_kernel(rows_ptr, row_ptr, out_ptr, T, N, num_slots, stride_r, stride_o,
                    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[t] = sum over slots k of rows[row[k * T + t]], in float32, slots in order."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask, cmask = toks < T, cols < N
    acc = tl.full((BLOCK_T, BLOCK_N), 0.0, tl.float32)
    for k in range(0, num_slots):
        r = tl.load(row_ptr + k * T + toks, mask=tmask, other=0).to(tl.int64)
        acc += tl.load(rows_ptr + r[:, None] * stride_r + cols[None, :], mask=tmask[:, None] & cmask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


def combine_rows(rows_PN: torch.Tensor, row_P: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(P, N) rows -> (T, N): each token's sum over its K rows; `row_P` is the row of each
    slot-major pair (`Dispatch.row_P`). Any layout of `rows_PN` (a gradient may come expanded)."""
    rows_PN, row_P = rows_PN.contiguous(), row_P.contiguous()
    P, N = rows_PN.shape
    out = rows_PN.new_empty(num_tokens, N)
    if num_tokens and N:
        _combine_kernel[(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(N, BLOCK_N))](
            rows_PN, row_P, out, num_tokens, N, P // num_tokens, rows_PN.stride(0), out.stride(0),
            BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return out

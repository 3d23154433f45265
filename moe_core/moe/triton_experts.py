"""Triton kernels for routed SwiGLU experts: scattered-to-grouped matmuls, forward and backward.

Shape legend: T tokens, D model dim, E experts, F expert width, P kept (token, slot) pairs sorted
by expert (see `dispatch.py`).

Design (after ScatterMoE, Tan et al. 2024):
- Nothing is copied or padded before the first matmul: `gather_gemm` reads each pair's token row
  of x through the sorted `token_P` index, in row tiles that never straddle two experts (a small
  tile map built from the per-expert counts), and multiplies by that expert's weight.
- The down projection's output is scaled by the pair's gate inside the kernel (fused epilogue).
- The combine back to tokens stays the deterministic gather-and-sum of `dispatch.combine` (no
  float atomics), also for the input gradient.
- Weight gradients come from `grouped_wgrad`: one program per (expert, tile of the weight),
  looping over that expert's rows; an expert with no rows gets zeros.
- Accumulation is float32 for every input dtype; float32 inputs use IEEE products (no TF32), so
  parity with the reference path is exact up to summation order.

The op is registered with `torch.library.custom_op` (forward and backward), so `torch.compile`
traces around it. On CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`),
which is how the parity tests run in CI; on CUDA they are compiled and autotuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moe_core.moe.dispatch import Dispatch

# Triton's CPU interpreter computes tl.dot of bfloat16 operands wrongly (Triton 3.9: errors of
# 1e10 on a 16x16 product); under it, operands are widened to float32 before the dot. Compiled
# kernels multiply bfloat16 directly on the tensor cores, accumulating in float32 either way.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Autotuning candidates on GPU: a small list, keyed by the problem's K and N. Row tiles (BLOCK_M)
# are fixed per call because the tile map depends on them. Under the interpreter one small
# config keeps the tests fast.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (256, 32, 8, 3)]
]
_CPU_CONFIGS = [triton.Config({"BLOCK_N": 16, "BLOCK_K": 16})]
_CONFIGS = _CPU_CONFIGS if INTERPRETED else _GPU_CONFIGS
_WGRAD_CONFIGS = (
    [triton.Config({"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_M": 16})] if INTERPRETED else
    [triton.Config({"BLOCK_K": bk, "BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=3)
     for bk, bn, bm, w in [(64, 64, 32, 4), (128, 64, 32, 8), (64, 128, 64, 8), (128, 128, 32, 8)]]
)
BLOCK_M = 16 if INTERPRETED else 64  # rows per tile of the pair list


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in float32: IEEE products for float32 (no TF32)."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.autotune(configs=_CONFIGS, key=["K", "N"])
@triton.jit
def _gather_gemm_kernel(
    a_ptr, idx_ptr, b_ptr, c_ptr, scale_ptr, tile_e_ptr, tile_start_ptr, tile_end_ptr,
    K, N, stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_IDX: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[r] = A[idx[r]] @ B[e(r)] (* scale[r]) for the rows r of one tile, all of one expert."""
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e_ptr + pid_t).to(tl.int64)
    start, end = tl.load(tile_start_ptr + pid_t), tl.load(tile_end_ptr + pid_t)
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64) if HAS_IDX else rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        acc += _dot(a, b, IEEE, UPCAST)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.autotune(configs=_WGRAD_CONFIGS, key=["K", "N"])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, idx_ptr, g_ptr, w_ptr, offs_ptr,
    K, N, stride_am, stride_ak, stride_gm, stride_gn, stride_we, stride_wk, stride_wn,
    HAS_IDX: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W[e] = A[idx[rows of e]]^T @ G[rows of e]: one (expert, K tile, N tile) per program."""
    e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start, end = tl.load(offs_ptr + e), tl.load(offs_ptr + e + 1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask, nmask = ks < K, ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        src = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64) if HAS_IDX else rows.to(tl.int64)
        a = tl.load(a_ptr + src[None, :] * stride_am + ks[:, None] * stride_ak, mask=kmask[:, None] & rmask[None, :], other=0.0)
        g = tl.load(g_ptr + rows[:, None] * stride_gm + ns[None, :] * stride_gn, mask=rmask[:, None] & nmask[None, :], other=0.0)
        acc += _dot(a, g, IEEE, UPCAST)
    tl.store(w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn,
             acc.to(w_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


def _tiles(counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row tiles of BLOCK_M pairs that never straddle experts: (expert, start, end) per tile."""
    counts = counts_E.to(torch.int64)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    per = (counts + BLOCK_M - 1) // BLOCK_M
    tile_e = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), per)
    first = torch.cumsum(per, 0) - per
    within = torch.arange(tile_e.numel(), device=counts.device) - first[tile_e]
    tile_start = starts[tile_e] + within * BLOCK_M
    return tile_e.to(torch.int32), tile_start.to(torch.int32), ends[tile_e].to(torch.int32)


def gather_gemm(a: torch.Tensor, idx: torch.Tensor | None, b_EKN: torch.Tensor, tiles: tuple, num_rows: int,
                scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows r (grouped by expert as in `tiles`): a[idx[r]] @ b[e(r)] (* scale[r]). `b_EKN` may be
    a transposed view (any strides)."""
    K, N = b_EKN.shape[1], b_EKN.shape[2]
    c = torch.empty(num_rows, N, device=a.device, dtype=out_dtype or a.dtype)
    tile_e, tile_start, tile_end = tiles
    if num_rows == 0 or tile_e.numel() == 0:
        return c.zero_()
    grid = lambda meta: (tile_e.numel(), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _gather_gemm_kernel[grid](
        a, idx if idx is not None else tile_e, b_EKN, c, scale if scale is not None else a, tile_e, tile_start, tile_end,
        K, N, a.stride(0), a.stride(1), b_EKN.stride(0), b_EKN.stride(1), b_EKN.stride(2), c.stride(0), c.stride(1),
        HAS_IDX=idx is not None, HAS_SCALE=scale is not None, IEEE=a.dtype == torch.float32, UPCAST=INTERPRETED,
        BLOCK_M=BLOCK_M,
    )
    return c


def grouped_wgrad(a: torch.Tensor, idx: torch.Tensor | None, g: torch.Tensor, offsets: torch.Tensor,
                  num_experts: int, out_dtype: torch.dtype) -> torch.Tensor:
    """W[e] = a[idx[rows of e]]^T @ g[rows of e], shape (E, a.shape[1], g.shape[1])."""
    K, N = a.shape[1], g.shape[1]
    w = torch.empty(num_experts, K, N, device=a.device, dtype=out_dtype)
    grid = lambda meta: (num_experts, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    _grouped_wgrad_kernel[grid](
        a, idx if idx is not None else offsets, g, w, offsets,
        K, N, a.stride(0), a.stride(1), g.stride(0), g.stride(1), w.stride(0), w.stride(1), w.stride(2),
        HAS_IDX=idx is not None, IEEE=a.dtype == torch.float32, UPCAST=INTERPRETED,
    )
    return w


# -- the op: forward and backward as custom ops, joined by register_autograd ------------------
def _pairs_to_tokens(rows_PD: torch.Tensor, row_P: torch.Tensor, num_pairs: int, num_tokens: int) -> torch.Tensor:
    """Sum each token's pair rows without atomics (as `dispatch.combine`)."""
    return rows_PD.index_select(0, row_P).view(-1, num_tokens, rows_PD.shape[-1]).sum(dim=0)


@torch.library.custom_op("moe_sweep::triton_experts", mutates_args=())
def triton_experts_op(x_TD: torch.Tensor, gates_P: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      token_P: torch.Tensor, pair_P: torch.Tensor, kept_E: torch.Tensor,
                      num_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_TD combined output, a13_PF2 pre-activations, h_PF hidden) for pairs sorted by expert."""
    tiles = _tiles(kept_E)
    P = token_P.numel()
    a13 = gather_gemm(x_TD, token_P, w13, tiles, P)  # tokens read in place through token_P
    gate, up = a13.chunk(2, dim=-1)
    h = (torch.nn.functional.silu(gate.float()) * up.float()).to(x_TD.dtype)
    y_PD = gather_gemm(h, None, w2, tiles, P, scale=gates_P)  # gate fused into the output
    return _pairs_to_tokens(y_PD, pair_P, num_pairs, x_TD.shape[0]), a13, h


@triton_experts_op.register_fake
def _(x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, num_pairs):
    P, F2 = token_P.shape[0], w13.shape[2]
    return x_TD.new_empty(x_TD.shape), x_TD.new_empty(P, F2), x_TD.new_empty(P, F2 // 2)


@torch.library.custom_op("moe_sweep::triton_experts_backward", mutates_args=())
def triton_experts_backward_op(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, gates_P: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    token_P: torch.Tensor, pair_P: torch.Tensor, kept_E: torch.Tensor, a13: torch.Tensor, h: torch.Tensor, num_pairs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x_TD, d gates_P, d w13, d w2)."""
    tiles = _tiles(kept_E)
    P, E = token_P.numel(), w13.shape[0]
    offsets = torch.cat([kept_E.new_zeros(1), torch.cumsum(kept_E, 0)]).to(torch.int32)
    dy = dy_TD.contiguous().index_select(0, token_P)  # each pair gets its token's output gradient
    dhu = gather_gemm(dy, None, w2.transpose(1, 2), tiles, P, out_dtype=torch.float32)  # dy @ w2^T, ungated
    d_gates = (dhu * h.float()).sum(-1).to(gates_P.dtype)
    dh = dhu * gates_P.float()[:, None]
    dyg = (dy.float() * gates_P.float()[:, None]).to(dy.dtype)
    dw2 = grouped_wgrad(h, None, dyg, offsets, E, torch.float32).to(w2.dtype)
    gate, up = a13.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    d13 = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * gate * sig], dim=-1).to(x_TD.dtype)
    dX_PD = gather_gemm(d13, None, w13.transpose(1, 2), tiles, P)  # d13 @ w13^T
    dw13 = grouped_wgrad(x_TD, token_P, d13, offsets, E, torch.float32).to(w13.dtype)
    return _pairs_to_tokens(dX_PD, pair_P, num_pairs, x_TD.shape[0]), d_gates, dw13, dw2


@triton_experts_backward_op.register_fake
def _(dy_TD, x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, a13, h, num_pairs):
    return x_TD.new_empty(x_TD.shape), gates_P.new_empty(gates_P.shape), w13.new_empty(w13.shape), w2.new_empty(w2.shape)


def _setup_context(ctx, inputs, output) -> None:
    x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, num_pairs = inputs
    _, a13, h = output
    ctx.num_pairs = num_pairs
    ctx.save_for_backward(x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, a13, h)


def _backward(ctx, dy_TD, _da13, _dh):
    x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, a13, h = ctx.saved_tensors
    dx, d_gates, dw13, dw2 = triton_experts_backward_op(dy_TD, x_TD, gates_P, w13, w2, token_P, pair_P, kept_E, a13, h,
                                                        ctx.num_pairs)
    return dx, d_gates, dw13, dw2, None, None, None, None


triton_experts_op.register_autograd(_backward, setup_context=_setup_context)


def experts_triton(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, dispatch: Dispatch,
                   gates_P: torch.Tensor) -> torch.Tensor:
    """The Triton backend: y_TD = sum over a token's kept pairs of gate * expert(x)."""
    y_TD, _, _ = triton_experts_op(x_TD.contiguous(), gates_P.contiguous(), w13, w2, dispatch.token_P,
                                   dispatch.row_P, dispatch.routed_E, dispatch.num_pairs)
    return y_TD

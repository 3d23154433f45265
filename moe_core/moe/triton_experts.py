"""Triton kernels for routed SwiGLU experts: forward and backward with the gathers, the SwiGLU and
the gate fused into the matmuls.

Shape legend: T tokens, D model dim, E experts, F expert width, K slots, P = K * T rows ((token,
slot) pairs sorted by expert, `dispatch.py`), M static number of row tiles.

Design (after ScatterMoE, Tan et al. 2024):
- Row tiles: BLOCK_M consecutive rows of one expert. The tile map (expert, start, end per tile) is
  built on the device from `offsets_E` with a static tile count M = P // BLOCK_M + min(E, P), a
  bound on the real count; the tiles past the real ones are empty (start == end) and their
  programs return at once. No host read, and launch grids depend on shapes only.
- Forward, two matmul kernels and a combine:
  `_up_kernel`      h13 = x[token_P] @ w13[e] (the token rows read in place through token_P),
                    the gate and up columns [j] and [F + j] in two accumulators; the epilogue
                    stores h13 (P, 2F) for backward and a = silu(g) * u * gate (P, F).
  `_gemm_kernel`    y_P = a @ w2[e] (contiguous rows).
  `combine_rows`    y_T[t] = sum over slots k of y_P[row_P[k * T + t]] (`triton_combine.py`: float32
                    sum, no atomics).
- Backward:
  `_dh_kernel`      dA = dy[token_P] @ w2[e]^T (dy rows read through token_P); the epilogue
                    loads h13 and writes dh13 = SwiGLU'(h13) * dA * gate (P, 2F), and per-row
                    partial sums of dA * silu(g) * u (the gate gradient) into a small float32
                    (P, cdiv(F, MIN_BLOCK_N)) buffer, summed afterwards (no atomics).
  `_gemm_kernel`    dx_P = dh13 @ w13[e]^T, then `combine_rows` to tokens.
  `_wgrad_kernel`   dw13[e] = x[token_P]^T @ dh13 and dw2[e] = a^T @ dy[token_P] (x and dy rows
                    read through token_P): one program per (weight tile, expert), looping over
                    the expert's rows, the busiest experts first; an expert without rows gets
                    zeros. Any number of experts up to 65,535 (CUDA's grid y limit), one launch.
- Operands go into `tl.dot` in their own dtype (bf16/fp16 on tensor cores; fp32 with IEEE
  products, no TF32) and accumulate in float32. Every tensor outside the kernels is in the
  compute dtype except the (P, F / MIN_BLOCK_N) gate partials; nothing is cast or copied
  around the kernels.

The op is a `torch.library.custom_op` (forward and backward joined by `register_autograd`), so
`torch.compile` traces around it. On CPU the kernels run only under Triton's interpreter
(`TRITON_INTERPRET=1`); on CUDA they are compiled and autotuned.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moe_core.moe.dispatch import Dispatch
from moe_core.moe.triton_combine import combine_rows

# Triton's CPU interpreter computes tl.dot of bfloat16 operands wrongly (Triton 3.9: errors of
# 1e10 on a 16x16 product); under it, operands are widened to float32 before the dot. Compiled
# kernels multiply bfloat16 directly on the tensor cores, accumulating in float32 either way.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Row tiles per call. Fixed: the tile map depends on it. 64 rows is one Hopper wgmma atom and
# wastes at most 63 padded rows per expert (fine-grained experts get a few hundred rows each).
BLOCK_M = 16 if INTERPRETED else 64

# GPU autotuning candidates (H100), keyed by the problem dims (and, by Triton, the dtypes). Every
# config was compiled for sm_90 at D = 1024, F in {128, 256, 512, 1024, 4096}, bf16 and fp32, with
# Triton 3.9 and, in a PyTorch 2.11 environment like the GPU image's, Triton 3.6
# (`bench/triton_sm90.py` under each): none left spills registers or needs over 227 KB of shared
# memory for the operand widths it is marked for (16: bf16/fp16, 32: float32, whose IEEE dots run
# on CUDA cores and hold more registers); the others were dropped, or kept for 16-bit operands
# only (Triton 3.6 spilled 8-144 bytes in the float32 builds of the first up, the last gemm and
# the first three wgrad configs).
# (BLOCK_N, BLOCK_K, num_warps, num_stages, operand bits)
_UP = [(64, 64, 4, 4, (16,)), (128, 64, 8, 3, (16, 32)), (128, 64, 8, 4, (16,)), (64, 128, 4, 3, (16,)),
       (128, 128, 8, 2, (16,))]
_GEMM = [(64, 64, 4, 4, (16, 32)), (128, 64, 4, 4, (16,)), (128, 64, 8, 3, (16,)), (256, 64, 8, 3, (16,)),
         (128, 128, 8, 3, (16,)), (64, 64, 8, 3, (32,))]
_DH = [(64, 64, 4, 4, (16, 32)), (64, 64, 8, 3, (16, 32)), (128, 64, 8, 3, (16, 32)), (64, 128, 8, 3, (16, 32)),
       (128, 128, 8, 2, (16,))]
# (BLOCK_K, BLOCK_N, BLOCK_M rows per step, num_warps, num_stages, operand bits)
_WGRAD = [(64, 128, 64, 4, 3, (16,)), (128, 128, 64, 8, 3, (16,)), (128, 64, 64, 4, 4, (16,)),
          (128, 256, 64, 8, 3, (16,)), (64, 64, 64, 4, 4, (16, 32))]


def _config(kwargs, warps=4, stages=3, bits=(16, 32)):
    c = triton.Config(kwargs, num_warps=warps, num_stages=stages)
    c.operand_bits = bits
    return c


def _configs(table):
    if INTERPRETED:  # one small config keeps the parity tests fast
        return [_config({"BLOCK_N": 32, "BLOCK_K": 32})]
    return [_config({"BLOCK_N": n, "BLOCK_K": k}, w, s, bits) for n, k, w, s, bits in table]


def _wgrad_configs():
    if INTERPRETED:
        return [_config({"BLOCK_K": 32, "BLOCK_N": 32, "BLOCK_M": 16})]
    return [_config({"BLOCK_K": k, "BLOCK_N": n, "BLOCK_M": m}, w, s, bits) for k, n, m, w, s, bits in _WGRAD]


def _for_dtype_of(arg: str) -> dict:
    """Autotuning prunes to the configs marked for the operand width of `arg`."""
    def prune(configs, named_args, **kwargs):
        return [c for c in configs if named_args[arg].element_size() * 8 in c.operand_bits]
    return {"early_config_prune": prune}


_DH_CONFIGS = _configs(_DH)
# The gate partials have one column per MIN_BLOCK_N columns of F whatever config runs, so the
# buffer's shape is fixed before autotuning picks one (see `_dh_kernel`). Interpreted, 16 < 32
# exercises the programs that own more than one column.
MIN_BLOCK_N = 16 if INTERPRETED else 64
assert all(c.kwargs["BLOCK_N"] % MIN_BLOCK_N == 0 for c in _DH_CONFIGS)
_EVEN_K = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}


@triton.autotune(configs=_configs(_UP), key=["K", "F"], prune_configs_by=_for_dtype_of("x_ptr"))
@triton.heuristics(_EVEN_K)
@triton.jit
def _up_kernel(
    x_ptr, token_ptr, w_ptr, gate_ptr, h13_ptr, a_ptr, tiles_ptr, num_tiles,
    K, F, stride_xt, stride_we, stride_wk, stride_wf, stride_h, stride_a,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h13[r] = x[token[r]] @ w13[e]; a[r] = silu(h13[r, :F]) * h13[r, F:] * gate[r]."""
    pid = tl.program_id(0)  # this program's row tile (see `tile_map`)
    e = tl.load(tiles_ptr + pid).to(tl.int64)
    start = tl.load(tiles_ptr + num_tiles + pid)
    end = tl.load(tiles_ptr + 2 * num_tiles + pid)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows = tl.where(rmask, rows, start).to(tl.int64)  # clamped into the tile: loads need no row mask
    tok = tl.load(token_ptr + rows).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xt + ks[None, :]
    wg_ptrs = w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wf
    wu_ptrs = wg_ptrs + F * stride_wf
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs)
            wg = tl.load(wg_ptrs, mask=cmask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=cmask[None, :], other=0.0)
        else:
            kmask = k0 + ks < K
            xt = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            xt, wg, wu = xt.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(xt, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    # The activation is computed from the stored (rounded) pre-activations, as backward sees them.
    g = acc_g.to(h13_ptr.dtype.element_ty)
    u = acc_u.to(h13_ptr.dtype.element_ty)
    mask = rmask[:, None] & cmask[None, :]
    h_ptrs = h13_ptr + rows[:, None] * stride_h + cols[None, :]
    tl.store(h_ptrs, g, mask=mask)
    tl.store(h_ptrs + F, u, mask=mask)
    g, u = g.to(tl.float32), u.to(tl.float32)
    gate = tl.load(gate_ptr + rows).to(tl.float32)
    act = g / (1 + tl.exp(-g)) * u * gate[:, None]
    tl.store(a_ptr + rows[:, None] * stride_a + cols[None, :], act.to(a_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_GEMM), key=["K", "N"], prune_configs_by=_for_dtype_of("a_ptr"))
@triton.heuristics(_EVEN_K)
@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, tiles_ptr, num_tiles,
    K, N, stride_a, stride_be, stride_bk, stride_bn, stride_c,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """c[r] = a[r] @ b[e] for the contiguous rows r of one expert's tile (`b` any strides)."""
    pid = tl.program_id(0)  # this program's row tile (see `tile_map`)
    e = tl.load(tiles_ptr + pid).to(tl.int64)
    start = tl.load(tiles_ptr + num_tiles + pid)
    end = tl.load(tiles_ptr + 2 * num_tiles + pid)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows = tl.where(rmask, rows, start).to(tl.int64)  # clamped into the tile: loads need no row mask
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + e * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs, mask=cmask[None, :], other=0.0)
        else:
            kmask = k0 + ks < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptr + rows[:, None] * stride_c + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.autotune(configs=_DH_CONFIGS, key=["K", "F"], prune_configs_by=_for_dtype_of("dy_ptr"))
@triton.heuristics(_EVEN_K)
@triton.jit
def _dh_kernel(
    dy_ptr, token_ptr, w_ptr, gate_ptr, h13_ptr, dh13_ptr, dgate_ptr, tiles_ptr, num_tiles,
    K, F, num_parts, stride_dy, stride_we, stride_wf, stride_wk, stride_h,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, MIN_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA = dy[token[r]] @ w2[e]^T; dh13[r] = SwiGLU'(h13[r]) * dA * gate[r]; gate partials
    sum_f dA * silu(g) * u for this program's columns."""
    pid = tl.program_id(0)  # this program's row tile (see `tile_map`)
    e = tl.load(tiles_ptr + pid).to(tl.int64)
    start = tl.load(tiles_ptr + num_tiles + pid)
    end = tl.load(tiles_ptr + 2 * num_tiles + pid)
    if start >= end:
        return
    rows = start + tl.arange(0, BLOCK_M)
    rmask = rows < end
    rows = tl.where(rmask, rows, start).to(tl.int64)  # clamped into the tile: loads need no row mask
    pid_n = tl.program_id(1)
    tok = tl.load(token_ptr + rows).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < F
    ks = tl.arange(0, BLOCK_K)
    dy_ptrs = dy_ptr + tok[:, None] * stride_dy + ks[None, :]
    w_ptrs = w_ptr + e * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wf  # w2[e]^T
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            dy = tl.load(dy_ptrs)
            w = tl.load(w_ptrs, mask=cmask[None, :], other=0.0)
        else:
            kmask = k0 + ks < K
            dy = tl.load(dy_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    mask = rmask[:, None] & cmask[None, :]
    h_ptrs = h13_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    sig = 1 / (1 + tl.exp(-g))
    silu = g * sig
    part = tl.sum(acc * silu * u, axis=1)  # masked columns: g = u = 0
    gate = tl.load(gate_ptr + rows).to(tl.float32)
    d_act = acc * gate[:, None]
    d_ptrs = dh13_ptr + rows[:, None] * stride_h + cols[None, :]
    tl.store(d_ptrs, (d_act * u * sig * (1 + g * (1 - sig))).to(dh13_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptrs + F, (d_act * silu).to(dh13_ptr.dtype.element_ty), mask=mask)
    # This program owns partial columns [pid_n * R, (pid_n + 1) * R): its sum goes in the first,
    # zeros in the others, so every column is written whatever BLOCK_N the autotuner picked.
    R: tl.constexpr = BLOCK_N // MIN_BLOCK_N
    j = pid_n * R + tl.arange(0, R)
    vals = tl.where(tl.arange(0, R)[None, :] == 0, part[:, None], 0.0)
    tl.store(dgate_ptr + rows[:, None] * num_parts + j[None, :], vals, mask=rmask[:, None] & (j < num_parts)[None, :])


@triton.autotune(configs=_wgrad_configs(), key=["K", "N"], prune_configs_by=_for_dtype_of("a_ptr"))
@triton.jit
def _wgrad_kernel(
    a_ptr, a_idx_ptr, g_ptr, g_idx_ptr, w_ptr, offsets_ptr, order_ptr,
    K, N, stride_a, stride_g, stride_we, stride_wk, stride_wn,
    A_IDX: tl.constexpr, G_IDX: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """w[e] = A[rows of e]^T @ G[rows of e] for the expert e = order[program_id(1)], one weight
    tile per program_id(0); A and G rows read through an index when given."""
    e = tl.load(order_ptr + tl.program_id(1))
    num_n = (N + BLOCK_N - 1) // BLOCK_N  # (tl.cdiv, tl.sigmoid and tl.zeros: jit calls, slow interpreted)
    pid_k, pid_n = tl.program_id(0) // num_n, tl.program_id(0) % num_n
    start = tl.load(offsets_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offsets_ptr + e)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask, nmask = ks < K, ns < N
    acc = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        rows = tl.where(rmask, rows, start)
        a_rows = tl.load(a_idx_ptr + rows) if A_IDX else rows
        g_rows = tl.load(g_idx_ptr + rows) if G_IDX else rows
        a = tl.load(a_ptr + a_rows.to(tl.int64)[None, :] * stride_a + ks[:, None],
                    mask=kmask[:, None] & rmask[None, :], other=0.0)
        g = tl.load(g_ptr + g_rows.to(tl.int64)[:, None] * stride_g + ns[None, :],
                    mask=rmask[:, None] & nmask[None, :], other=0.0)
        if UPCAST:
            a, g = a.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(a, g, acc, input_precision=PRECISION)
    tl.store(w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn,
             acc.to(w_ptr.dtype.element_ty), mask=kmask[:, None] & nmask[None, :])


# -- launchers ----------------------------------------------------------------------------------
def num_row_tiles(num_pairs: int, num_experts: int, block_m: int = BLOCK_M) -> int:
    """Static bound on the row tiles of any routing: an expert with c rows takes ceil(c / BLOCK_M)
    <= floor(c / BLOCK_M) + 1 tiles, and at most min(E, P) experts have rows."""
    return num_pairs // block_m + min(num_experts, num_pairs)


def tile_map(offsets_E: torch.Tensor, num_pairs: int, block_m: int = BLOCK_M) -> torch.Tensor:
    """int32 (3, M): expert, start row and end row of each BLOCK_M row tile, tiles never
    straddling experts; M = `num_row_tiles` (static), the tiles past the real ones empty
    (start == end == 0). Device ops only: no host read."""
    E = offsets_E.numel()
    ends = offsets_E.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    starts = ends - counts
    per = (counts + block_m - 1) // block_m
    tile_ends = torch.cumsum(per, 0)
    t = torch.arange(num_row_tiles(num_pairs, E, block_m), device=offsets_E.device)
    e = torch.searchsorted(tile_ends, t, right=True)  # the first expert whose tiles end past t
    real = e < E
    e = e.clamp(max=E - 1)
    start = starts[e] + (t - (tile_ends - per)[e]) * block_m
    end = torch.minimum(start + block_m, ends[e])
    zero = torch.zeros_like(start)
    return torch.stack((e, torch.where(real, start, zero), torch.where(real, end, zero))).to(torch.int32)


def _flags(x: torch.Tensor) -> dict:
    """float32 operands multiply with IEEE products (no TF32; the precision setting does nothing for
    16-bit operands). UPCAST: see INTERPRETED."""
    return {"PRECISION": "ieee" if x.dtype == torch.float32 else "tf32", "UPCAST": INTERPRETED}


def _gemm(a: torch.Tensor, b_EKN: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Rows of `a` (grouped as in `tiles`) times their expert's b (any strides)."""
    P, N = a.shape[0], b_EKN.shape[2]
    c = a.new_empty(P, N)
    M = tiles.shape[1]
    if M:
        _gemm_kernel[lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"]))](
            a, b_EKN, c, tiles, M, b_EKN.shape[1], N, a.stride(0), *b_EKN.stride(), c.stride(0),
            BLOCK_M=BLOCK_M, **_flags(a))
    return c


def expert_order(offsets_E: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """The experts the weight-gradient programs take, busiest first (they loop over all of an
    expert's rows, so the longest start first), at most one per row: min(E, P) of them. Past P
    experts the rest have no rows for sure and are zeroed without a program."""
    ends = offsets_E.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    order = torch.argsort(counts, descending=True, stable=True)
    return order[: min(offsets_E.numel(), num_pairs)].to(torch.int32)


def _wgrad(a, a_idx, g, g_idx, offsets_E: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(E, a.shape[1], g.shape[1]): a[rows of e]^T @ g[rows of e], rows through the indices."""
    E, K, N, S = offsets_E.numel(), a.shape[1], g.shape[1], order.numel()
    # Every expert gets a program when E <= P (one without rows writes zeros); with more experts
    # than rows, those left out are zeroed here (the same bytes the programs would write).
    w = a.new_empty(E, K, N) if S == E else a.new_zeros(E, K, N)
    if S:
        _wgrad_kernel[lambda meta: (triton.cdiv(K, meta["BLOCK_K"]) * triton.cdiv(N, meta["BLOCK_N"]), S)](
            a, a_idx if a_idx is not None else offsets_E, g, g_idx if g_idx is not None else offsets_E, w, offsets_E,
            order, K, N, a.stride(0), g.stride(0), *w.stride(), A_IDX=a_idx is not None, G_IDX=g_idx is not None,
            **_flags(a))
    return w


# -- the op: forward and backward as custom ops, joined by register_autograd --------------------
@torch.library.custom_op("moe_sweep::triton_experts", mutates_args=())
def triton_experts_op(
    x_TD: torch.Tensor, gates_P: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    token_P: torch.Tensor, row_P: torch.Tensor, offsets_E: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_TD, h13_P2F pre-activations, a_PF gated activations, tile map), rows sorted by expert.
    x, gates and weights of one dtype; the weights may have any strides."""
    P, F = token_P.numel(), w2.shape[1]
    x_TD, gates_P, token_P, row_P = x_TD.contiguous(), gates_P.contiguous(), token_P.contiguous(), row_P.contiguous()
    tiles = tile_map(offsets_E, P)
    h13 = x_TD.new_empty(P, 2 * F)
    a = x_TD.new_empty(P, F)
    M = tiles.shape[1]
    if M:
        _up_kernel[lambda meta: (M, triton.cdiv(F, meta["BLOCK_N"]))](
            x_TD, token_P, w13, gates_P, h13, a, tiles, M, x_TD.shape[1], F, x_TD.stride(0), *w13.stride(),
            h13.stride(0), a.stride(0), BLOCK_M=BLOCK_M, **_flags(x_TD))
    y_PD = _gemm(a, w2, tiles)
    return combine_rows(y_PD, row_P, x_TD.shape[0]), h13, a, tiles


@triton_experts_op.register_fake
def _(x_TD, gates_P, w13, w2, token_P, row_P, offsets_E):
    P, F = token_P.shape[0], w2.shape[1]
    M = num_row_tiles(P, offsets_E.shape[0])
    return (x_TD.new_empty(x_TD.shape), x_TD.new_empty(P, 2 * F), x_TD.new_empty(P, F),
            offsets_E.new_empty(3, M, dtype=torch.int32))


@torch.library.custom_op("moe_sweep::triton_experts_backward", mutates_args=())
def triton_experts_backward_op(
    dy_TD: torch.Tensor, x_TD: torch.Tensor, gates_P: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    token_P: torch.Tensor, row_P: torch.Tensor, offsets_E: torch.Tensor, tiles: torch.Tensor,
    h13: torch.Tensor, a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x_TD, d gates_P, d w13, d w2)."""
    P, F = token_P.numel(), w2.shape[1]
    dy_TD, x_TD, gates_P, token_P, row_P = (t.contiguous() for t in (dy_TD, x_TD, gates_P, token_P, row_P))
    M = tiles.shape[1]
    dh13 = h13.new_empty(P, 2 * F)
    num_parts = triton.cdiv(F, MIN_BLOCK_N)
    parts = torch.empty(P, num_parts, device=x_TD.device, dtype=torch.float32)
    if M:
        _dh_kernel[lambda meta: (M, triton.cdiv(F, meta["BLOCK_N"]))](
            dy_TD, token_P, w2, gates_P, h13, dh13, parts, tiles, M, x_TD.shape[1], F, num_parts,
            dy_TD.stride(0), *w2.stride(), h13.stride(0), MIN_BLOCK_N=MIN_BLOCK_N, BLOCK_M=BLOCK_M, **_flags(x_TD))
    d_gates = parts.sum(dim=1).to(gates_P.dtype)
    dx_TD = combine_rows(_gemm(dh13, w13.transpose(1, 2), tiles), row_P, x_TD.shape[0])
    order = expert_order(offsets_E, P)
    dw13 = _wgrad(x_TD, token_P, dh13, None, offsets_E, order)
    dw2 = _wgrad(a, None, dy_TD, token_P, offsets_E, order)
    return dx_TD, d_gates, dw13, dw2


@triton_experts_backward_op.register_fake
def _(dy_TD, x_TD, gates_P, w13, w2, token_P, row_P, offsets_E, tiles, h13, a):
    return tuple(t.new_empty(t.shape) for t in (x_TD, gates_P, w13, w2))


def _setup_context(ctx, inputs, output) -> None:
    x_TD, gates_P, w13, w2, token_P, row_P, offsets_E = inputs
    _, h13, a, tiles = output
    ctx.save_for_backward(x_TD, gates_P, w13, w2, token_P, row_P, offsets_E, tiles, h13, a)


def _backward(ctx, dy_TD, _dh13, _da, _dtiles):
    x_TD, gates_P, w13, w2, token_P, row_P, offsets_E, tiles, h13, a = ctx.saved_tensors
    dx, d_gates, dw13, dw2 = triton_experts_backward_op(
        dy_TD.to(x_TD.dtype), x_TD, gates_P, w13, w2, token_P, row_P, offsets_E, tiles, h13, a)
    return dx, d_gates, dw13, dw2, None, None, None


triton_experts_op.register_autograd(_backward, setup_context=_setup_context)


def experts_triton(x_TD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, dispatch: Dispatch,
                   gates_P: torch.Tensor) -> torch.Tensor:
    """The Triton backend: y_TD = sum over a token's kept rows of gate * expert(x). Operands in
    one compute dtype (`experts._operands`); gates_P zero for dropped rows."""
    y_TD, _, _, _ = triton_experts_op(x_TD, gates_P.to(x_TD.dtype), w13, w2, dispatch.token_P, dispatch.row_P,
                                      dispatch.offsets_E)
    return y_TD

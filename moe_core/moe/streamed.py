"""CPU fast path for dropless or dropping SwiGLU experts: stream expert chunks through the cache.

Shape legend: T tokens, D model dim, F expert width, E experts, P kept (token, slot) pairs,
R rows (pairs) of one chunk.

On a CPU the expert GEMMs run near peak, but a k-times-expanded (P, D) activation (the gathered
inputs, the per-pair outputs, and their gradients) costs a full trip to main memory per pass,
which at k = 8 took as long as the GEMMs themselves. Here the pairs, already sorted by expert, are
cut into chunks of whole experts of about `CHUNK_BYTES` of input rows: each chunk gathers its
rows, runs both projections, and adds its gated outputs into the result while they are still in
cache. Nothing of size (P, D) is ever allocated; only the (P, 2F) hidden activation is saved for
backward, chunk by chunk (the same as a dense FFN saves), and the gathers are recomputed there.

The combine is `index_add_`, which on CPU adds rows in index order (no atomics), so results are
deterministic run to run. The plain reference in `experts.py` is the oracle for this path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moe_core.moe.dispatch import Dispatch
from moe_core.moe.grouped_gemm import mm_groups, offsets_from_counts, wgrad_groups
from moe_core.moe.swiglu import swiglu_activation, swiglu_backward

CHUNK_BYTES = 2 << 20  # gathered input rows per chunk: fits the L2/L3 of common CPUs


def plan_chunks(counts: list[int], rows_per_chunk: int) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) of consecutive chunks of whole experts,
    each of at least `rows_per_chunk` rows but the last; together they cover every expert."""
    chunks, e0, r0, acc = [], 0, 0, 0
    for e, c in enumerate(counts):
        acc += c
        if acc >= rows_per_chunk:
            chunks.append((e0, e + 1, r0, r0 + acc))
            e0, r0, acc = e + 1, r0 + acc, 0
    if e0 < len(counts):  # the remainder, possibly experts without rows
        chunks.append((e0, len(counts), r0, r0 + acc))
    return chunks


class StreamedExperts(torch.autograd.Function):
    """y = sum over kept pairs of gate * SwiGLU_e(x[token]), computed chunk by chunk."""

    @staticmethod
    def forward(ctx, x_TD, gates_P, w13_EDF2, w2_EFD, token_P, counts: list[int], chunks):
        width = w2_EFD.shape[1]
        out_TD = torch.zeros_like(x_TD)
        h_chunks = []  # (R, 2F) hidden pre-activations, kept per chunk (no concatenation copy)
        for e0, e1, r0, r1 in chunks:
            if r0 == r1:
                continue
            tok = token_P[r0:r1]
            offs = offsets_from_counts(counts[e0:e1])
            h_R2F = mm_groups(x_TD.index_select(0, tok), w13_EDF2[e0:e1], offs)
            a_RF = F.silu(h_R2F[:, :width]).mul_(h_R2F[:, width:]).mul_(gates_P[r0:r1, None])
            out_TD.index_add_(0, tok, mm_groups(a_RF, w2_EFD[e0:e1], offs))
            h_chunks.append(h_R2F)
        ctx.save_for_backward(x_TD, gates_P, w13_EDF2, w2_EFD, token_P, *h_chunks)
        ctx.counts, ctx.chunks = counts, chunks
        return out_TD

    @staticmethod
    @once_differentiable  # the hand-written backward is not itself differentiable
    def backward(ctx, dout_TD):
        x_TD, gates_P, w13_EDF2, w2_EFD, token_P, *h_chunks = ctx.saved_tensors
        dout_TD = dout_TD.contiguous()
        dx_TD = torch.zeros_like(x_TD)
        # Uninitialised: every expert's slice is written below. At large expert counts these are
        # the biggest tensors of the layer, and zero-filling them first cost a full extra pass.
        dw13, dw2 = torch.empty_like(w13_EDF2), torch.empty_like(w2_EFD)
        dgates_P = torch.empty_like(gates_P)
        w13_t, w2_t = w13_EDF2.transpose(1, 2), w2_EFD.transpose(1, 2)
        h_iter = iter(h_chunks)
        for e0, e1, r0, r1 in ctx.chunks:
            if r0 == r1:
                dw13[e0:e1].zero_()
                dw2[e0:e1].zero_()
                continue
            tok, counts = token_P[r0:r1], ctx.counts[e0:e1]
            offs = offsets_from_counts(counts)
            dy_RD = dout_TD.index_select(0, tok)
            h_R2F = next(h_iter)
            act, sig = swiglu_activation(h_R2F)
            g_R1 = gates_P[r0:r1, None]
            dw2[e0:e1] = wgrad_groups(act * g_R1, dy_RD, offs)
            d_act = mm_groups(dy_RD, w2_t[e0:e1], offs)
            dgates_P[r0:r1] = (d_act * act).sum(dim=-1)
            dh_R2F = swiglu_backward(h_R2F, d_act.mul_(g_R1), sig)
            dw13[e0:e1] = wgrad_groups(x_TD.index_select(0, tok), dh_R2F, offs)
            dx_TD.index_add_(0, tok, mm_groups(dh_R2F, w13_t[e0:e1], offs))
        return dx_TD, dgates_P, dw13, dw2, None, None, None


def experts_streamed(x_TD: torch.Tensor, gates_P: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                     dispatch: Dispatch) -> torch.Tensor:
    """Entry point: drop the rows over capacity, plan chunks from the per-group counts (host
    reads, free on a CPU) and run. Within an expert the kept rows come first, so the remaining
    rows stay grouped by expert; a default expert (overflow) is one group more."""
    token_P = dispatch.token_P
    if dispatch.keep_P is not None:
        rows = dispatch.keep_P.nonzero().squeeze(1)
        token_P, gates_P = token_P.index_select(0, rows), gates_P.index_select(0, rows)
    counts = dispatch.computed_G.tolist()
    rows = max(1, CHUNK_BYTES // (x_TD.shape[1] * x_TD.element_size()))
    return StreamedExperts.apply(x_TD, gates_P, w13_EDF2, w2_EFD, token_P, counts, plan_chunks(counts, rows))

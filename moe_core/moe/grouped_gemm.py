"""Grouped matrix multiply: rows of `a` grouped by expert, times that expert's matrix.

Groups are given by `offsets` (int32, device): the end row of each group, so group e is rows
offsets[e-1]:offsets[e]. `torch._grouped_mm` takes them as they are, on the device, with no host
synchronisation, where it is exact and fast for the device and dtype; elsewhere a loop of
`torch.mm` over the groups does the same after reading the offsets (one host read). The two are
checked against each other in tests.
"""

from __future__ import annotations

import torch

# torch._grouped_mm's CUDA kernel takes fewer than 1,024 groups per call (it checks
# group_count < 1024, "Can't process more than 1024 groups"); more experts are multiplied in
# chunks of whole groups.
MAX_GROUPS_PER_CALL = 1023


def grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Where `torch._grouped_mm` is correct and fast (measured against the per-group loop).

    It needs both operands' rows aligned to 16 bytes. CPU: float32 only (bfloat16 runs but is
    ~30x slower than the loop). CUDA: bfloat16 on sm90+.
    """
    if not hasattr(torch, "_grouped_mm") or a.dtype != b.dtype:
        return False
    if any(n * a.element_size() % 16 for n in (a.shape[-1], b.shape[-1], b.shape[-2])):
        return False
    if a.device.type == "cpu":
        return a.dtype == torch.float32
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] >= 9
    return False


def offsets_from_counts(counts: torch.Tensor | list[int], device: torch.device | None = None) -> torch.Tensor:
    """int32 cumulative ends of groups of the given sizes."""
    counts = torch.as_tensor(counts, device=device)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def grouped_matmul(a_PX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of `a` in groups ending at `offsets_E`; group e is multiplied by b[e]. Differentiable.

    The groups must cover every row (offsets_E[-1] == rows of `a`, as for a dispatch's pairs):
    zeroing rows past the last group would cost a pass over the output that the GEMM doesn't.
    """
    return grouped_mm_op(a_PX, b_EXY, offsets_E)


def grouped_weight_grad(a_PX: torch.Tensor, g_PY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """out[e] = a[rows of e]^T @ g[rows of e], shape (E, X, Y); zeros for a group without rows."""
    return grouped_wgrad_op(a_PX, g_PY, offsets_E)


def mm_groups(a_PX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul` without autograd or the custom-op round trip (~35 us a call): for
    hand-written backward passes that run eagerly (the CPU `streamed` path)."""
    if not grouped_mm_usable(a_PX, b_EXY):
        return _loop(a_PX, b_EXY, offsets_E)
    num_groups = b_EXY.shape[0]
    if num_groups <= MAX_GROUPS_PER_CALL:
        return torch._grouped_mm(a_PX, b_EXY, offs=offsets_E)
    # Chunks of whole groups. A chunk's first row depends on the routing, so this reads the
    # chunk boundaries from the device once: the one host synchronisation left, and only for
    # more experts than one call takes.
    out = a_PX.new_zeros(a_PX.shape[0], b_EXY.shape[-1])
    for groups, start, end in _chunks(offsets_E):
        if end > start:
            out[start:end] = torch._grouped_mm(a_PX[start:end], b_EXY[groups], offs=offsets_E[groups] - start)
    return out


def _chunks(offsets_E: torch.Tensor) -> list[tuple[slice, int, int]]:
    """(groups, first row, end row) of consecutive chunks of at most MAX_GROUPS_PER_CALL groups;
    reads the chunk boundaries from the device once."""
    num_groups = offsets_E.numel()
    firsts = list(range(0, num_groups, MAX_GROUPS_PER_CALL))
    lasts = [min(e0 + MAX_GROUPS_PER_CALL, num_groups) - 1 for e0 in firsts]
    ends = offsets_E[lasts].tolist()
    return [(slice(e0, e1 + 1), start, end) for e0, e1, start, end in zip(firsts, lasts, [0, *ends[:-1]], ends)]


def wgrad_groups(a_PX: torch.Tensor, g_PY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """`grouped_weight_grad` without the custom-op round trip (see `mm_groups`)."""
    num_groups = offsets_E.numel()
    if not grouped_mm_usable(a_PX, g_PY):
        ends = offsets_E.tolist()
        out = a_PX.new_empty(num_groups, a_PX.shape[1], g_PY.shape[1])
        for e, (s, t) in enumerate(zip([0, *ends[:-1]], ends)):
            torch.mm(a_PX[s:t].t(), g_PY[s:t], out=out[e])
        return out
    if num_groups <= MAX_GROUPS_PER_CALL:
        out = torch._grouped_mm(a_PX.t(), g_PY, offs=offsets_E)
    else:
        out = torch.cat([torch._grouped_mm(a_PX[start:end].t(), g_PY[start:end], offs=offsets_E[groups] - start)
                         for groups, start, end in _chunks(offsets_E)])
    if out.device.type == "cpu":  # torch's CPU fallback runs mm_out on every group, empty ones too
        return out
    # The CUDA kernel may leave an empty group's slice unwritten: zero it on the device (no host
    # read), in place (a copy would be one more pass over every weight gradient).
    counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    return out.masked_fill_((counts == 0)[:, None, None], 0)


# -- custom ops: torch.compile sees them whole. `torch._grouped_mm`'s own fake (meta) kernel accepts
# only bfloat16, so compiling the float32 CPU path through it would fail; these ops carry their
# own shape functions and autograd, and call `torch._grouped_mm` (or the loop) when they run.
@torch.library.custom_op("moe_sweep::grouped_mm", mutates_args=())
def grouped_mm_op(a_PX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return mm_groups(a_PX, b_EXY, offsets_E)


@grouped_mm_op.register_fake
def _(a_PX, b_EXY, offsets_E):
    return a_PX.new_empty(a_PX.shape[0], b_EXY.shape[-1])


@torch.library.custom_op("moe_sweep::grouped_wgrad", mutates_args=())
def grouped_wgrad_op(a_PX: torch.Tensor, g_PY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    return wgrad_groups(a_PX, g_PY, offsets_E)


@grouped_wgrad_op.register_fake
def _(a_PX, g_PY, offsets_E):
    return a_PX.new_empty(offsets_E.shape[0], a_PX.shape[1], g_PY.shape[1])


def _setup(ctx, inputs, output) -> None:
    a_PX, b_EXY, offsets_E = inputs
    ctx.save_for_backward(a_PX, b_EXY, offsets_E)


def _backward(ctx, grad_PY):
    a_PX, b_EXY, offsets_E = ctx.saved_tensors
    grad_PY = grad_PY.contiguous()
    grad_a = grouped_mm_op(grad_PY, b_EXY.transpose(1, 2), offsets_E) if ctx.needs_input_grad[0] else None
    grad_b = grouped_wgrad_op(a_PX, grad_PY, offsets_E) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup)


def _loop(a_PX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """The plain per-group loop (one host read of the offsets)."""
    ends = offsets_E.tolist()
    out = a_PX.new_zeros(a_PX.shape[0], b_EXY.shape[-1])
    for g, (s, e) in enumerate(zip([0, *ends[:-1]], ends)):
        if e > s:
            torch.mm(a_PX[s:e], b_EXY[g], out=out[s:e])
    return out

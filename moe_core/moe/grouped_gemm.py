"""Grouped matrix multiply: rows of `a` grouped by expert, times that expert's matrix.

Groups are given by `offsets` (int32, device): the end row of each group, so group e is rows
offsets[e-1]:offsets[e]. `torch._grouped_mm` takes them as they are, on the device, with no host
synchronisation, where it is exact and fast for the device and dtype; elsewhere a loop of
`torch.mm` over the groups does the same after reading the offsets (one host read). The two are
checked against each other in tests.
"""

from __future__ import annotations

import torch

# torch._grouped_mm's CUDA kernel refuses more than 1,024 groups per call ("Can't process more
# than 1024 groups"); more experts are multiplied in chunks of whole groups.
MAX_GROUPS_PER_CALL = 1024


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

    Rows past the last offset are not part of any group; their output rows are unspecified.
    """
    num_groups = b_EXY.shape[0]
    if not grouped_mm_usable(a_PX, b_EXY):
        return _loop(a_PX, b_EXY, offsets_E)
    if num_groups <= MAX_GROUPS_PER_CALL:
        return torch._grouped_mm(a_PX, b_EXY, offs=offsets_E)
    # Chunks of whole groups. A chunk's first row depends on the routing, so this reads the
    # chunk boundaries from the device once: the one host synchronisation left, and only for
    # more experts than one call takes.
    firsts = range(0, num_groups, MAX_GROUPS_PER_CALL)
    lasts = [min(e0 + MAX_GROUPS_PER_CALL, num_groups) - 1 for e0 in firsts]
    ends = offsets_E[lasts].tolist()
    parts, start = [], 0
    for e0, e1, end in zip(firsts, lasts, ends):
        parts.append(torch._grouped_mm(a_PX[start:end], b_EXY[e0 : e1 + 1], offs=offsets_E[e0 : e1 + 1] - start))
        start = end
    return _pad_rows(parts, a_PX.shape[0] - start, b_EXY)


def _pad_rows(parts: list[torch.Tensor], tail: int, b_EXY: torch.Tensor) -> torch.Tensor:
    """Concatenate the groups' outputs; rows outside every group come out as zeros."""
    if tail > 0:
        parts.append(parts[0].new_zeros(tail, b_EXY.shape[-1]) if parts else b_EXY.new_zeros(tail, b_EXY.shape[-1]))
    return torch.cat(parts, dim=0)


def _loop(a_PX: torch.Tensor, b_EXY: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """The plain per-group loop (one host read of the offsets); autograd records each matmul."""
    ends = offsets_E.tolist()
    starts = [0, *ends[:-1]]
    parts = [a_PX[s:e] @ b_EXY[g] for g, (s, e) in enumerate(zip(starts, ends))]
    return _pad_rows(parts, a_PX.shape[0] - (ends[-1] if ends else 0), b_EXY)

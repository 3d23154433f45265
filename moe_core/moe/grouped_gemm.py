"""Grouped matrix multiply: rows of `a` grouped by expert, times that expert's matrix.

`torch._grouped_mm` does all groups in one call where it is exact and fast; elsewhere a loop of
`torch.mm` over the groups does the same (the two are checked against each other in tests).
"""

from __future__ import annotations

import torch


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


def grouped_matmul(
    a_PX: torch.Tensor, b_EXY: torch.Tensor, counts: torch.Tensor | list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of `a` come in groups of `counts[e]` rows, in order; group e is multiplied by b[e].

    With `out` the result is written there (no autograd: for hand-written backward passes).
    """
    if grouped_mm_usable(a_PX, b_EXY):
        if isinstance(counts, list):
            counts = torch.tensor(counts, device=a_PX.device)
        y = torch._grouped_mm(a_PX, b_EXY, offs=torch.cumsum(counts, 0, dtype=torch.int32))
        return y if out is None else out.copy_(y)
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    if out is None:  # differentiable: autograd records each group's matmul
        return torch.cat([part @ b_EXY[e] for e, part in enumerate(a_PX.split(counts))], dim=0)
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(a_PX[start : start + c], b_EXY[e], out=out[start : start + c])
        start += c
    return out

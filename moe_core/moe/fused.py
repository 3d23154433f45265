"""Where the fused Triton kernels stand in for plain PyTorch ops: on CUDA tensors, in eager mode.

Under torch.compile inductor fuses the plain versions by itself (and cannot trace a raw Triton
launch without a custom op), so the plain versions are what it sees. On CPU the plain versions
are the fast ones. Each fused kernel has its plain version beside it and tests comparing the two
(under Triton's CPU interpreter here, on the device on a GPU machine).
"""

from __future__ import annotations

import functools
import importlib.util

import torch


# The kernels compute in float32 registers: float64 keeps the plain ops, which compute in float64.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_kernels_available(t: torch.Tensor) -> bool:
    """Whether the fused Triton kernels take tensors like `t`: CUDA, a dtype they compute exactly
    (`FUSED_DTYPES`), eager mode, Triton installed."""
    return (t.device.type == "cuda" and t.dtype in FUSED_DTYPES and not torch.compiler.is_compiling()
            and _triton_installed())


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None

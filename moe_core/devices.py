"""Accelerator peaks: the one table the trainer's MFU and the planner's run-time estimates share.

Dense bf16 tensor-core FLOP/s from the vendors' data sheets (no sparsity), keyed by a fragment of
the name CUDA reports (`torch.cuda.get_device_name`, e.g. "NVIDIA H100 80GB HBM3"). Imports no
torch, so the planner can read it.
"""

from __future__ import annotations

GPU_PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """The peak of the first table entry whose key is in `device_name` (None if unknown). Longer
    keys are tried first, so "L40S" is never read as "L4"."""
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):
        if key.upper() in device_name.upper():
            return GPU_PEAK_FLOPS[key]
    return None

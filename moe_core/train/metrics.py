"""Per-step metrics: routing columns; throughput and MFU."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from moe_core.devices import gpu_peak_flops


@functools.lru_cache(maxsize=None)
def measured_cpu_flops() -> float:
    """Float32 matmul FLOP/s of this CPU, measured once (a few hundred ms)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def peak_flops(device: torch.device, configured: float | None) -> float:
    if configured:
        return configured
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        return peak if peak is not None else float("nan")
    return measured_cpu_flops()


def routing_columns(stats: dict[str, Any]) -> dict[str, float]:
    """The routing statistics worth a column per step: model-wide summary and per-layer load."""
    if not stats:
        return {}
    cols = {f"routing/{k}": float(v) for k, v in stats["summary"].items()}
    for layer in stats["layers"]:
        cols[f"routing/L{layer['layer']}/max_load"] = layer["max_load"]
        cols[f"routing/L{layer['layer']}/entropy"] = layer["entropy"]
        cols[f"routing/L{layer['layer']}/dropped_fraction"] = layer["dropped_fraction"]
        cols[f"routing/L{layer['layer']}/silent_fraction"] = layer["silent_fraction"]
    for pool in stats.get("pools", []):
        cols[f"routing/pool{pool['pool']}/used_fraction"] = pool["used_fraction"]
        cols[f"routing/pool{pool['pool']}/unique_experts_per_token"] = pool["unique_experts_per_token"]
    return cols

"""Per-step metrics rows, written as Parquet atomically; throughput and MFU."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

# Dense bf16 tensor-core peak FLOP/s by device-name fragment (vendor data sheets, no sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows to Parquet (columns: the union of all rows' keys, missing values null), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


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
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        return float("nan")
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
    for pool in stats.get("pools", []):
        cols[f"routing/pool{pool['pool']}/used_fraction"] = pool["used_fraction"]
        cols[f"routing/pool{pool['pool']}/unique_experts_per_token"] = pool["unique_experts_per_token"]
    return cols

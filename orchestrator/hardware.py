"""What the planner assumes about hardware when it estimates run times.

Estimates are training FLOPs / (devices * peak FLOP/s * MFU). GPU peaks are dense bf16 tensor-core
figures from the vendors' data sheets; the MFU is a typical value for small MoE models, not a
promise. The CPU entry is per core and already effective (MFU folded in): the trainer ran a
4-layer d = 256 MoE at about 4,050 tokens/s x 23.7 MFLOP/token, about 48 GFLOP/s per core, on the
2-core development machine (`moe-sweep train configs/micro_moe.yaml`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # per device (per core for CPUs)
    mfu: float  # assumed share of peak a trial achieves
    unit: str  # what a "device" is: 'GPU' or 'CPU core'

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("cpu", 48e9, 1.0, "CPU core"),
        Hardware("a100", 312e12, 0.35, "GPU"),
        Hardware("h100", 989e12, 0.35, "GPU"),
        Hardware("h200", 989e12, 0.35, "GPU"),
    )
}

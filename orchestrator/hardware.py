"""What the planner assumes about hardware when it estimates run times and memory.

Estimates are training FLOPs / (devices * peak FLOP/s * MFU). GPU peaks are the trainer's table
(`moe_core.devices`: dense bf16 tensor-core figures from the vendors' data sheets); the MFU is a typical value for small MoE models, not a
promise. The CPU entry is per core and already effective (MFU folded in): the trainer ran a
4-layer d = 256 MoE at about 4,050 tokens/s x 23.7 MFLOP/token, about 48 GFLOP/s per core, on the
2-core development machine (`moe-sweep train configs/micro_moe.yaml`).

Memory is per device, in bytes, as the driver reports it (`nvidia-smi`'s memory.total, also
`torch.cuda.get_device_properties(0).total_memory`): a little under the data sheet's "80 GB" etc.,
which are GiB of which the driver keeps some. `moe_core.memory.fits` subtracts the CUDA context
and a fragmentation headroom from it. `a100` is the 40 GB model: planning for the smaller one
never starts a trial that cannot fit; name `a100-80gb` for the other. The CPU has None: CPU trials
live in host memory, and the planner cannot see the memory of the machines Ray will place them on.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_core.devices import GPU_PEAK_FLOPS

MIB = 1 << 20


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # per device (per core for CPUs)
    mfu: float  # assumed share of peak a trial achieves
    unit: str  # what a "device" is: 'GPU' or 'CPU core'
    memory_bytes: int | None = None  # per device; None where not checked (CPU)

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu


HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        Hardware("cpu", 48e9, 1.0, "CPU core"),
        Hardware("a100", GPU_PEAK_FLOPS["A100"], 0.35, "GPU", 40960 * MIB),
        Hardware("a100-80gb", GPU_PEAK_FLOPS["A100"], 0.35, "GPU", 81920 * MIB),
        Hardware("h100", GPU_PEAK_FLOPS["H100"], 0.35, "GPU", 81559 * MIB),
        Hardware("h200", GPU_PEAK_FLOPS["H200"], 0.35, "GPU", 143771 * MIB),
    )
}

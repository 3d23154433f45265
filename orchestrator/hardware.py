"""What the planner assumes about hardware when it estimates run times, memory and trial shapes.

A trial's planned wall time on w devices is

    hours(w) = start-up(w) + training FLOPs / (w * peak FLOP/s * MFU * dp_efficiency(w))

- **MFU**: a typical value for small MoE models, not a promise. GPU peaks are the trainer's
  table (`moe_core.devices`: dense bf16 tensor-core figures from the vendors' data sheets). The
  CPU entry is per core and already effective (MFU folded in): the trainer ran a 4-layer d = 256
  MoE at about 4,050 tokens/s x 23.7 MFLOP/token, about 48 GFLOP/s per core, on the 2-core
  development machine (`moe-sweep train configs/micro_moe.yaml`).
- **Start-up** (`StartupModel`): what a trial pays before its first step and does not scale
  with its tokens: processes, imports, the Ray Train worker group and its process group (gloo or
  NCCL), data, model build. The CPU entry is measured (`bench/trial_startup.py`, gloo, 1, 2 and
  4 workers on the 2-core machine); the GPU entries are estimates until measured on GPUs.
- **Data-parallel efficiency** (`dp_efficiency`): the share of w times one device's throughput
  that w data-parallel workers reach (all-reduce or FSDP all-gathers not hidden behind compute).
  A factor per doubling inside a node (NVLink) and a smaller one per doubling across nodes
  (the network). Estimates until measured on GPUs.

Memory is per device, in bytes, as the driver reports it (`nvidia-smi`'s memory.total, also
`torch.cuda.get_device_properties(0).total_memory`): a little under the data sheet's "80 GB" etc.,
which are GiB of which the driver keeps some. `moe_core.memory.fits` subtracts the CUDA context
and a fragmentation headroom from it. `a100` is the 40 GB model: planning for the smaller one
never starts a trial that cannot fit; name `a100-80gb` for the other. The CPU has None: CPU trials
live in host memory, and the planner cannot see the memory of the machines Ray will place them on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moe_core.devices import GPU_PEAK_FLOPS

MIB = 1 << 20


@dataclass(frozen=True)
class StartupModel:
    """Seconds from a trial's start to its first training step, by its number of workers."""

    single: float  # one worker: the trial's own process trains (no worker group)
    group: float  # a Ray Train worker group of two (its processes, the process group)
    per_doubling: float  # each further doubling of the group

    def seconds(self, workers: int) -> float:
        if workers <= 1:
            return self.single
        return self.group + self.per_doubling * math.log2(workers / 2)


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # per device (per core for CPUs)
    mfu: float  # assumed share of peak a trial achieves
    unit: str  # what a "device" is: 'GPU' or 'CPU core'
    memory_bytes: int | None = None  # per device; None where not checked (CPU)
    startup: StartupModel = StartupModel(0.0, 0.0, 0.0)
    intra_node_efficiency: float = 1.0  # dp efficiency kept per doubling of workers inside a node
    inter_node_efficiency: float = 1.0  # ... per doubling of nodes
    measured: str = "estimate"  # where the start-up and efficiency figures come from

    @property
    def effective_flops(self) -> float:
        return self.peak_flops * self.mfu

    def dp_efficiency(self, workers: int, per_node: int) -> float:
        """Throughput of `workers` data-parallel workers over `workers` x one worker's."""
        inside = min(workers, per_node)
        nodes = workers / per_node if workers > per_node else 1.0
        return self.intra_node_efficiency ** math.log2(inside) * self.inter_node_efficiency ** math.log2(nodes)

    def hours(self, train_flops: float, workers: int, per_node: int, devices_per_worker: float = 1.0) -> float:
        """Planned wall time of a trial with `workers` workers of `devices_per_worker` devices."""
        rate = self.effective_flops * workers * devices_per_worker * self.dp_efficiency(workers, per_node)
        return (self.startup.seconds(workers) + train_flops / rate) / 3600


# GPU start-up and efficiency: estimates (not yet measured on GPUs). One process importing torch
# and building a model and its data (~45 s on a GPU node with a warm page cache), a worker group
# adds its processes and NCCL's communicator set-up (~30 s), each doubling another ~10 s. DDP
# and FSDP overlap their collectives with the backward; what is left shows as ~3% per doubling
# over NVLink and ~8% per doubling over the network (InfiniBand) for these model sizes.
_GPU_STARTUP = StartupModel(single=45.0, group=75.0, per_doubling=10.0)
_GPU_EFF = dict(intra_node_efficiency=0.97, inter_node_efficiency=0.92)

HARDWARE: dict[str, Hardware] = {
    h.name: h
    for h in (
        # start-up measured with bench/trial_startup.py (2-core machine, gloo, Ray 2.60: 0.1 s
        # for one worker in Tune's reused process, 6.3 s for a group of two, 10.4 s for four,
        # medians of 3); a 2-core machine has no room for data-parallel speed-up, so efficiency stays 1.
        Hardware("cpu", 48e9, 1.0, "CPU core", startup=StartupModel(single=0.1, group=6.3, per_doubling=4.1),
                 measured="start-up measured (bench/trial_startup.py); efficiency not modelled"),
        Hardware("a100", GPU_PEAK_FLOPS["A100"], 0.35, "GPU", 40960 * MIB, _GPU_STARTUP, **_GPU_EFF),
        Hardware("a100-80gb", GPU_PEAK_FLOPS["A100"], 0.35, "GPU", 81920 * MIB, _GPU_STARTUP, **_GPU_EFF),
        Hardware("h100", GPU_PEAK_FLOPS["H100"], 0.35, "GPU", 81559 * MIB, _GPU_STARTUP, **_GPU_EFF),
        Hardware("h200", GPU_PEAK_FLOPS["H200"], 0.35, "GPU", 143771 * MIB, _GPU_STARTUP, **_GPU_EFF),
    )
}

"""Where an MoE layer's time goes, and how often a training step makes the host wait for the device.

(a) One MoE layer fwd+bwd (the layer of bench/moe_layer.py), under torch.profiler: the top ops by
    self device time on CUDA (each row an op and the kernel it launched directly) or by self CPU
    time on CPU, per step, after warm-up.
(b) Host synchronisations per training step (forward, backward, gradient clipping, AdamW step,
    `finish_step`; autocast bf16 on CUDA, as the trainer) of a small MoE model, per backend and for
    the dense model:
    - on any device, `moe_core.sync_audit.SyncAudit`: the ops that would make the host wait for a
      GPU (a value read back, or a value-dependent shape), per phase, and their Counter;
    - on CUDA also from a profiler trace: `cudaStreamSynchronize` / `cudaDeviceSynchronize` /
      `cudaEventSynchronize` calls, synchronous `cudaMemcpy` calls, and device-to-host copies
      (`Memcpy DtoH` on the device), per step (as counted in shared/gpu/evidence-*/train_profile.log).
    Not counted: the trainer's own once-per-step reads (the loss for logging, the gradient norm).
    SyncAudit cannot tell a host tensor from a device one for ops such as `.item()`: on CPU it
    counts what would sync if every tensor were on the GPU. AdamW is the fused one on every device
    (as the trainer on CUDA), whose step counters live with the parameters.

    python bench/profile_moe.py --device cpu                # small shapes, about 30 s on 2 cores
    python bench/profile_moe.py --device cuda               # T 16384, d 1024, d_ff 4096, bf16, g 1/8 n 64
    python bench/profile_moe.py --device cuda --backend grouped,triton --g 1/16 --n 1024
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from moe_layer import layer_step, moe_layer, top_k  # noqa: E402  (bench/ is not a package)

from moe_core import ModelConfig, build_model  # noqa: E402
from moe_core.sync_audit import SyncAudit  # noqa: E402

LAYER_SHAPES = {  # tokens, d_model, d_ff, dtype
    "cpu": (4096, 256, 1024, "float32"),
    "cuda": (16384, 1024, 4096, "bfloat16"),
}
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _short(name: str, width: int = 70) -> str:
    name = name.removeprefix("void ")
    for stop in ("<", "("):
        if stop in name and not name.startswith("_Z"):
            name = name[: name.index(stop)]
    return name if len(name) <= width else name[: width - 3] + "..."


def profile_layer(args, device: torch.device, backend: str) -> None:
    tokens, d_model, d_ff, dtype = args.tokens, args.d_model, args.d_ff, getattr(torch, args.dtype)
    torch.manual_seed(0)
    try:
        layer = moe_layer(d_model, d_ff, args.g, args.n, backend, device, dtype)
        x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
        step = layer_step(layer, x, torch.randn_like(x))
        for _ in range(args.warmup):
            step()
        _sync(device)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"##### layer {backend}: ERROR {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        _sync(device)
    n, top = args.steps, args.top
    events = prof.events()
    cpu_ms = sum(e.self_cpu_time_total for e in events if e.device_type.name == "CPU") / n / 1e3
    head = (f"##### layer fwd+bwd, backend {backend}, g={args.g} n={args.n} k={top_k(args.g)}, T={tokens} d={d_model} "
            f"d_ff={d_ff} {args.dtype}, per step (mean of {n}):")
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        dev_ms = sum(e.device_time_total for e in kernels) / n / 1e3 if kernels else 0.0
        print(f"{head} device busy {dev_ms:.2f} ms, {len(kernels) / n:.0f} kernels/copies, CPU op time {cpu_ms:.2f} ms")
        # Each kernel under the op that launched it (op -> kernels it launched directly).
        rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
        attributed = 0.0
        for e in events:
            if e.device_type.name != "CPU":
                continue
            for kern in getattr(e, "kernels", ()):
                row = rows[(e.name, kern.name)]
                row[0] += kern.duration
                row[1] += 1
                attributed += kern.duration
        rest = sum(e.device_time_total for e in kernels) - attributed
        if rest > 1:
            rows[("(no op)", "kernels launched outside any op")] = [rest, 0]
        print(f"   {'ms':>7s}  {'calls':>5s}  op  <-  kernel")
        for (op, kern), (us, count) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"   {us / n / 1e3:7.3f}  {count / n:5.0f}  {_short(op, 40)}  <-  {_short(kern)}")
    else:
        print(f"{head} CPU op time {cpu_ms:.2f} ms")
        print(f"   {'ms':>7s}  {'calls':>5s}  op (self CPU time)")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]:
            print(f"   {e.self_cpu_time_total / n / 1e3:7.3f}  {e.count / n:5.0f}  {_short(e.key, 90)}")


def small_model(backend: str | None, device: torch.device, args) -> torch.nn.Module:
    moe = {} if backend is None else {
        "layout": "layerwise", "backend": backend,
        "experts": [{"num_experts": args.n, "top_k": top_k(args.g), "granularity": args.g}],
    }
    cfg = ModelConfig.model_validate({"vocab_size": 512, "d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                      "d_ff": 512, "seq_len": 128, "moe": moe})
    torch.manual_seed(0)
    with torch.device(device):
        return build_model(cfg)


def count_syncs(args, device: torch.device, backend: str | None) -> None:
    name = "dense" if backend is None else backend
    try:
        model = small_model(backend, device, args)
        # Fused AdamW, as the trainer on CUDA: its step counters stay on the parameters' device (the
        # unfused one reads host-side counters with `.item()`, which SyncAudit would count on CPU).
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        gen = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, 512, (8, 129), generator=gen).to(device) for _ in range(8)]
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

        def step(i: int, audits: dict | None = None) -> None:
            idx, tgt = batches[i % len(batches)][:, :-1], batches[i % len(batches)][:, 1:]
            phase = (lambda p: audits[p]) if audits else (lambda p: contextlib.nullcontext())
            with phase("forward"), amp:
                loss = model(idx, tgt).loss
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.finish_step()

        for i in range(2):  # warm-up: lazy optimizer state, autotuning, allocator
            step(i)
        _sync(device)
        audits = {p: SyncAudit() for p in ("forward", "backward", "optimizer")}
        step(2, audits)
        _sync(device)
    except Exception as exc:  # noqa: BLE001
        print(f"{name:9s} ERROR {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
        return
    total = Counter()
    for audit in audits.values():
        total.update(audit.ops)
    phases = "  ".join(f"{p} {sum(a.ops.values())}" for p, a in audits.items())
    print(f"{name:9s} SyncAudit {sum(total.values()):3d} per step ({phases})  {dict(total.most_common())}")
    if device.type != "cuda":
        return
    steps = 3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3, 3 + steps):
            step(i)
        _sync(device)
    names = Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            if e.name.startswith("Memcpy DtoH"):
                names["Memcpy DtoH"] += 1
            continue
        for sync in SYNC_NAMES:  # runtime API names, possibly with a suffix (e.g. _ptsz)
            if e.name.startswith(sync):
                names[sync] += 1
        if e.name.startswith("cudaMemcpy") and "Async" not in e.name and "ToSymbol" not in e.name:
            names["cudaMemcpy"] += 1
    # The profiler's own `_sync` at the end is one cudaDeviceSynchronize of the whole run, not of a step.
    names["cudaDeviceSynchronize"] = max(0, names["cudaDeviceSynchronize"] - 1)
    waits = sum(names[k] for k in SYNC_NAMES) + names["cudaMemcpy"]
    detail = "  ".join(f"{k} {names[k] / steps:g}" for k in (*SYNC_NAMES, "cudaMemcpy", "Memcpy DtoH") if names[k])
    print(f"{name:9s} trace     {waits / steps:3g} host waits per step  ({detail or 'none'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--backend", help="comma list of backends for (a) (default auto on CPU, grouped,triton on CUDA)")
    ap.add_argument("--g", default="1/8")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--d-ff", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=3, help="profiled layer steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--sync-backends", help="comma list for (b) (default grouped,auto; on CUDA also triton)")
    ap.add_argument("--skip-layer", action="store_true", help="only (b)")
    ap.add_argument("--skip-sync", action="store_true", help="only (a)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tokens, d_model, d_ff, dtype = LAYER_SHAPES[device.type]
    args.tokens, args.d_model = args.tokens or tokens, args.d_model or d_model
    args.d_ff, args.dtype = args.d_ff or d_ff, args.dtype or dtype
    top_k(args.g)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"threads={torch.get_num_threads()}"
    print(f"{device} ({name}) torch {torch.__version__}", flush=True)

    if not args.skip_layer:
        for backend in (args.backend or ("grouped,triton" if device.type == "cuda" else "auto")).split(","):
            profile_layer(args, device, backend)
            sys.stdout.flush()
    if not args.skip_sync:
        sync_backends = args.sync_backends or ("grouped,auto,triton" if device.type == "cuda" else "grouped,auto")
        print(f"##### host synchronisations per training step: 2-layer MoE g={args.g} n={args.n} k={top_k(args.g)}, "
              f"d 128, 8 x 128 tokens{', bf16 autocast' if device.type == 'cuda' else ''}; dense for comparison")
        for backend in [None, *sync_backends.split(",")]:
            count_syncs(args, device, backend)
            sys.stdout.flush()


if __name__ == "__main__":
    main()

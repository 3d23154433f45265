"""Forward+backward time of one MoE layer against a FLOP-matched dense SwiGLU FFN and the grouped-GEMM floor.

Every MoE point (g, n) has k = 1/g, so it does the dense FFN's expert FLOPs plus a router. Per point
the bench times, alternately in one run (machines are noisy): the dense SwiGLU, the FLOOR, and each
backend (`moe.backend`, see moe_core/moe/experts.py). Each line prints medians, and ratios as the
median of per-repeat ratios:

    floor     g=1/8   n=   64 k=  8  dense     2.74 ms  floor     3.15 ms  1.15x
    router    g=1/8   n=   64 k=  8  dense     2.74 ms  alone  (ms)  (x dense)  floor (x floor)  [float32]
    grouped   g=1/8   n=   64 k=  8  dense     2.74 ms  moe       8.08 ms  2.95x  floor 2.57x

(the floor and grouped lines as an H100 printed them; the router line's format). The FLOOR is the
expert GEMMs alone: `torch._grouped_mm` forward and backward of both projections (with the plain
SwiGLU between them, as the dense FFN has) on P = T * k rows already sorted by expert and perfectly
balanced; no router, no gather, no gate, no combine. Experts go in static chunks of at most 1,023
groups per call (the CUDA kernel's limit), so n = 1024 works. Where `torch._grouped_mm` is not
usable (see `grouped_mm_usable`) the project's `grouped_matmul` (its per-group loop) stands in.
The ROUTER lines time the router alone (logits and softmax, forward and backward), its matmul in
float32 and, in a bfloat16 run, also in the compute dtype (`moe.router.dtype`; `--router-dtype`
sets the MoE layers'): what no backend fuses away, and at many experts no small part of the layer
(its FLOPs are n / (3 d_ff) of the experts': a twelfth at n = 1024, d_ff = 4096; and float32 runs
on a GPU's CUDA cores).

    python bench/moe_layer.py                      # CPU, float32: reference, streamed, grouped
    python bench/moe_layer.py --device cuda --dtype bfloat16 --d-model 1024 --d-ff 4096 --tokens 16384
    python bench/moe_layer.py --points 1/8:64,1/16:1024 --paths grouped

Timing: wall clock on CPU; CUDA events around each step on CUDA (after a synchronisation, so a step
starts on an idle GPU), warm-up first. On CPU with the streamed path a `floor-c` line adds that
path's own GEMM floor: its six GEMMs chunk by chunk on operands that stay in cache (at small expert
widths, many small GEMMs are slower than the dense FFN's few large ones even there). A backend
that raises prints its error on its line and the bench goes on. Goals: CPU fast path within 1.15x of dense; CUDA near the floor.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from fractions import Fraction

import torch
import torch.nn.functional as F

from moe_core import ExpertSetConfig, ModelConfig, MoEConfig, build_model
from moe_core.config import RouterConfig
from moe_core.layers import SwiGLU
from moe_core.moe.grouped_gemm import grouped_matmul, grouped_mm_usable, mm_groups, wgrad_groups
from moe_core.moe.router import Router
from moe_core.moe.streamed import CHUNK_BYTES

ROUTER_DTYPES = ("float32", "compute")
POINTS = [("1", 8), ("1/4", 32), ("1/8", 64), ("1/8", 256), ("1/16", 1024)]
# torch._grouped_mm's CUDA kernel checks `group_count < 1024`.
FLOOR_MAX_GROUPS = 1023


def top_k(g: str) -> int:
    k = 1 / Fraction(g)
    if k.denominator != 1:
        raise ValueError(f"granularity {g}: 1/g must be a whole number of slots")
    return int(k)


def moe_layer(d_model: int, d_ff: int, g: str, n: int, backend: str, device, dtype, router_dtype: str = "float32"):
    """One MoE FFN (router + experts) of a one-layer model, as a function x_TD -> y_TD with `.params`.
    Built on the device directly (no host-side init of large expert banks)."""
    cfg = ModelConfig(
        vocab_size=2, d_model=d_model, n_layers=1, n_heads=1, d_ff=d_ff,
        moe=MoEConfig(layout="layerwise", experts=(ExpertSetConfig(num_experts=n, top_k=top_k(g), granularity=g),),
                      backend=backend, router=RouterConfig(dtype=router_dtype)),
    )
    with torch.device(device):
        model = build_model(cfg)
    model = model.to(dtype=dtype)
    ffn = model.blocks[0].ffn

    def layer(x):
        return ffn(x)  # outside a model forward: its routing record is not kept

    layer.params = list(model.parameters())
    return layer


def floor_step(tokens: int, d_model: int, d_ff: int, g: str, n: int, device, dtype):
    """A zero-argument fwd+bwd step of the expert GEMMs alone (see module docstring)."""
    k, width = top_k(g), int(d_ff * Fraction(g))
    per_expert = tokens * k // n  # perfectly balanced (P = T * k rows when n divides it)
    num_chunks = math.ceil(n / FLOOR_MAX_GROUPS)
    size = math.ceil(n / num_chunks)
    # Each chunk its own leaf tensors, so no slicing or concatenation enters the timing.
    chunks = []
    for e0 in range(0, n, size):
        e = min(size, n - e0)
        rows = e * per_expert
        chunks.append((
            torch.randn(rows, d_model, device=device, dtype=dtype, requires_grad=True),
            (torch.randn(e, d_model, 2 * width, device=device, dtype=dtype) * 0.02).requires_grad_(),
            (torch.randn(e, width, d_model, device=device, dtype=dtype) * 0.02).requires_grad_(),
            torch.arange(1, e + 1, device=device, dtype=torch.int32) * per_expert,
            torch.randn(rows, d_model, device=device, dtype=dtype),
        ))
    xs, w13, w2 = chunks[0][:3]
    raw = grouped_mm_usable(xs, w13) and grouped_mm_usable(xs.new_empty(1, width), w2)

    def mm(a, b, offs):
        return torch._grouped_mm(a, b, offs=offs) if raw else grouped_matmul(a, b, offs)

    def step():
        outs, grads = [], []
        for xs, w13, w2, offs, grad in chunks:
            for p in (xs, w13, w2):
                p.grad = None
            gate, up = mm(xs, w13, offs).chunk(2, dim=-1)
            outs.append(mm(F.silu(gate) * up, w2, offs))
            grads.append(grad)
        torch.autograd.backward(outs, grads)

    step.impl = "torch._grouped_mm" if raw else "grouped_matmul (loop)"
    return step


def cached_floor_step(tokens: int, d_model: int, d_ff: int, g: str, n: int, chunk_bytes: int):
    """CPU: the six GEMMs (forward, data and weight gradients of both projections) of the
    `streamed` path, chunk after chunk of its size, each chunk on the same operands, so they stay
    in cache as the streamed path's do: its GEMM floor. No autograd, gather, combine or SwiGLU."""
    k, width = top_k(g), int(d_ff * Fraction(g))
    per_expert = max(1, tokens * k // n)
    experts = max(1, min(n, chunk_bytes // (per_expert * d_model * 4)))  # whole experts per chunk
    rows = experts * per_expert
    x, dy = torch.randn(rows, d_model), torch.randn(rows, d_model)
    h, a = torch.randn(rows, 2 * width), torch.randn(rows, width)
    w13, w2 = torch.randn(n, d_model, 2 * width), torch.randn(n, width, d_model)
    offs = torch.arange(1, experts + 1, dtype=torch.int32) * per_expert

    def step():  # as streamed.py calls them; the last chunk may hold fewer experts
        for e0 in range(0, n, experts):
            e = min(experts, n - e0)
            r, o = e * per_expert, offs[:e]
            w13_c, w2_c = w13[e0:e0 + e], w2[e0:e0 + e]
            mm_groups(x[:r], w13_c, o), mm_groups(a[:r], w2_c, o)
            wgrad_groups(a[:r], dy[:r], o), mm_groups(dy[:r], w2_c.transpose(1, 2), o)
            wgrad_groups(x[:r], h[:r], o), mm_groups(h[:r], w13_c.transpose(1, 2), o)

    return step


def router_step(x: torch.Tensor, n: int, router_dtype: str, grad_scale: float = 1e-3):
    """The router alone, forward and backward (logits' matmul in `router_dtype`, softmax in
    float32): the part of an MoE layer the floor leaves out besides the gather, gate and combine."""
    router = Router(x.shape[1], ((n, 1),), RouterConfig(dtype=router_dtype)).to(x.device)
    torch.nn.init.normal_(router.weight_ND, std=0.02)
    grad = torch.randn(x.shape[0], n, device=x.device) * grad_scale

    def step():
        for p in (x, router.weight_ND):
            p.grad = None
        router(x)[1].backward(grad)

    return step


def layer_step(fn, x: torch.Tensor, grad: torch.Tensor):
    """As in training after `zero_grad(set_to_none=True)`: backward stores fresh gradients."""
    def step():
        for p in [x, *fn.params]:
            p.grad = None
        fn(x).backward(grad)

    return step


class Timer:
    """Milliseconds of one call: wall clock on CPU, CUDA events (after a sync) on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, step) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def _error(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:240]}"


def _recover(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:  # a sticky CUDA error: later cases will report it too
            pass
        torch.cuda.empty_cache()


def time_cases(cases: dict, device: torch.device, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Warm up, then time every case once per repeat, in turn. Returns (ms lists, errors)."""
    timer, times, errors = Timer(device), {name: [] for name in cases}, {}
    live = dict(cases)
    for name, step in list(live.items()):
        try:
            for _ in range(warmup):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()  # surfaces asynchronous errors here; keeps the cached memory
        except Exception as exc:  # noqa: BLE001 - report and go on
            errors[name] = _error(exc)
            del live[name]
            _recover(device)
    for _ in range(repeats):
        for name, step in list(live.items()):
            try:
                times[name].append(timer(step))
            except Exception as exc:  # noqa: BLE001
                errors[name] = _error(exc)
                del live[name]
                _recover(device)
    return times, errors


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def parse_points(spec: str | None) -> list[tuple[str, int]]:
    if not spec:
        return POINTS
    points = []
    for item in spec.split(","):
        g, _, n = item.strip().partition(":")
        top_k(g)  # validates g
        points.append((g, int(n)))
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per case (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per case first (default 1 on CPU, 3 on CUDA)")
    ap.add_argument("--paths", default=None, help="comma list of backends: reference, streamed, grouped, triton, auto "
                    "(default: reference,streamed,grouped on CPU; grouped,triton on CUDA)")
    ap.add_argument("--points", default=None, help="comma list of g:n, e.g. 1/8:64,1/16:1024 (default: "
                    + ",".join(f"{g}:{n}" for g, n in POINTS) + ")")
    ap.add_argument("--no-floor", action="store_true", help="skip the grouped-GEMM floor")
    ap.add_argument("--no-router", action="store_true", help="skip timing the router alone")
    ap.add_argument("--router-dtype", default="float32", choices=ROUTER_DTYPES,
                    help="moe.router.dtype of the MoE layers (the router lines time both)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    paths = [p for p in (args.paths or ("grouped,triton" if cuda else "reference,streamed,grouped")).split(",") if p]
    repeats = args.repeats or (20 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    points = parse_points(args.points)
    prec = 2 if cuda else 1

    torch.manual_seed(0)
    dense = SwiGLU(args.d_model, args.d_ff).to(device=device, dtype=dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense.params = list(dense.parameters())
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    where = f"{device} ({torch.cuda.get_device_name(device)})" if cuda else f"{device} threads={torch.get_num_threads()}"
    print(f"T={args.tokens} d={args.d_model} d_ff={args.d_ff} {where} {args.dtype} repeats={repeats} "
          f"torch {torch.__version__}", flush=True)

    for g, n in points:
        k = top_k(g)
        head = f"g={g:5s} n={n:5d} k={k:3d}"
        cases, errors = {"dense": layer_step(dense, x, grad)}, {}
        if not args.no_floor:
            try:
                cases["floor"] = floor_step(args.tokens, args.d_model, args.d_ff, g, n, device, dtype)
            except Exception as exc:  # noqa: BLE001
                errors["floor"] = _error(exc)
            if not cuda and "streamed" in paths:
                cases["floor-c"] = cached_floor_step(args.tokens, args.d_model, args.d_ff, g, n, CHUNK_BYTES)
        if not args.no_router:  # the float32 router, and the compute-dtype one where that differs
            for rd in ROUTER_DTYPES if dtype != torch.float32 else ("float32",):
                cases[f"router {rd}"] = router_step(x, n, rd)
        for path in paths:
            try:
                torch.manual_seed(0)  # the same weights, so the same routing, for every backend
                cases[path] = layer_step(moe_layer(args.d_model, args.d_ff, g, n, path, device, dtype,
                                                   args.router_dtype), x, grad)
            except Exception as exc:  # noqa: BLE001
                errors[path] = _error(exc)
                _recover(device)
        times, run_errors = time_cases(cases, device, repeats, warmup)
        errors.update(run_errors)
        if "dense" in errors:
            print(f"{'dense':9s} {head}  ERROR {errors['dense']}", flush=True)
            continue
        t_dense = statistics.median(times["dense"])
        floor = times.get("floor") if "floor" not in errors else None
        if not args.no_floor:
            if floor:
                impl = "" if cases["floor"].impl == "torch._grouped_mm" else f"  [{cases['floor'].impl}]"
                print(f"{'floor':9s} {head}  dense {t_dense:8.{prec}f} ms  floor {statistics.median(floor):8.{prec}f} ms  "
                      f"{_ratio(floor, times['dense']):.2f}x{impl}", flush=True)
            else:
                print(f"{'floor':9s} {head}  ERROR {errors.get('floor', 'no timings')}", flush=True)
        if "floor-c" in times:
            t = times["floor-c"]
            print(f"{'floor-c':9s} {head}  dense {t_dense:8.{prec}f} ms  floor-c {statistics.median(t):8.{prec}f} ms  "
                  f"{_ratio(t, times['dense']):.2f}x  [the streamed path's GEMMs alone, in cache]", flush=True)
        for name in [c for c in cases if c.startswith("router")]:
            if name in errors:
                print(f"{'router':9s} {head}  ERROR {errors[name]}", flush=True)
                continue
            vs_floor = f"  floor {_ratio(times[name], floor):.2f}x" if floor else ""
            t = times[name]
            print(f"{'router':9s} {head}  dense {t_dense:8.{prec}f} ms  alone  {statistics.median(t):8.{prec}f} ms  "
                  f"{_ratio(t, times['dense']):.2f}x{vs_floor}  [{name.split()[1]}]", flush=True)
        for path in paths:
            if path in errors:
                print(f"{path:9s} {head}  ERROR {errors[path]}", flush=True)
                continue
            t = times[path]
            vs_floor = f"  floor {_ratio(t, floor):.2f}x" if floor else ""
            print(f"{path:9s} {head}  dense {t_dense:8.{prec}f} ms  moe {statistics.median(t):8.{prec}f} ms  "
                  f"{_ratio(t, times['dense']):.2f}x{vs_floor}", flush=True)
        del cases
        gc.collect()
        _recover(device)


if __name__ == "__main__":
    main()

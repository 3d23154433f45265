"""Compile every Triton kernel of moe_core for an H100 (sm_90) on a machine without a GPU, and
print what each launch needs: registers per thread, spilled bytes, shared memory per block.

Triton compiles ahead of time for a target it does not have, and its wheel ships `ptxas` and
`cuobjdump`, so this runs anywhere Triton installs. Every launch of the `triton` backend's forward
and backward (up, down, combine, dh, dx, dw13, dw2) and of the fused SwiGLU (`triton_swiglu.py`) is
compiled for every autotuning config that the operand dtype keeps, with the specialisation the
runtime would give it (ints equal to 1 become constants, multiples of 16 and tensors get
16-divisibility), at the shapes given. A config that spills registers (STACK or LOCAL bytes) or
needs more than the H100's 227 KB of shared memory per block will not run fast there, or at all:
the script says which and exits 1. Not a timing: that needs the GPU (bench/moe_layer.py).

    python bench/triton_sm90.py                                  # D 1024, F 128..4096, bf16 and fp32
    python bench/triton_sm90.py --widths 512 --dtypes bfloat16   # one width (about 15 s on 2 cores)

Needs TRITON_INTERPRET unset (the interpreter compiles nothing); the script unsets it for itself.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported

import torch  # noqa: E402
import triton  # noqa: E402

from moe_core.moe import triton_combine, triton_experts, triton_swiglu  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may opt into on sm_90
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class Resources:
    """What one compiled launch needs on sm_90."""

    launch: str
    width: int
    dtype: str
    config: str
    registers: int
    spilled: int  # STACK + LOCAL bytes per thread
    shared: int  # bytes per block

    @property
    def problem(self) -> str | None:
        if self.spilled:
            return f"spills {self.spilled} bytes"
        if self.shared > H100_SHARED_BYTES:
            return f"needs {self.shared // 1024} KB of shared memory (H100: 227 KB)"
        return None


def _capture(calls, kernels: dict) -> list:
    """Run `calls()` with the named module-level kernels replaced by recorders: every launch is
    recorded as (name, kernel, args, kwargs), none runs. Works on meta tensors."""
    launches = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, self.kernel, args, kwargs))

    saved = [(module, name, getattr(module, name)) for module, names in kernels.items() for name in names]
    for module, name, kernel in saved:
        setattr(module, name, Recorder(name, kernel))
    try:
        calls()
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)
    return launches


def _expert_launches(d_model: int, width: int, dtype: torch.dtype, num_tokens: int, num_experts: int, top_k: int):
    """The triton backend's forward and backward launches, in order, on meta tensors."""
    x = torch.empty(num_tokens, d_model, device="meta", dtype=dtype)
    w13 = torch.empty(num_experts, d_model, 2 * width, device="meta", dtype=dtype)
    w2 = torch.empty(num_experts, width, d_model, device="meta", dtype=dtype)
    num_pairs = num_tokens * top_k
    token_P = torch.arange(num_pairs, device="meta") % num_tokens
    offsets_E = torch.empty(num_experts, device="meta", dtype=torch.int32)
    gates_P = x.new_empty(num_pairs)

    def calls():
        fwd, bwd = triton_experts.triton_experts_op, triton_experts.triton_experts_backward_op
        y, h13, a, tiles = fwd._init_fn(x, gates_P, w13, w2, token_P, token_P, offsets_E)
        bwd._init_fn(y, x, gates_P, w13, w2, token_P, token_P, offsets_E, tiles, h13, a)

    kernels = {triton_experts: ("_up_kernel", "_gemm_kernel", "_dh_kernel", "_wgrad_kernel"),
               triton_combine: ("_combine_kernel",)}
    names = ["up", "down", "combine", "dh", "dx", "combine", "dw13", "dw2"]
    return [(name, *rest) for name, (_, *rest) in zip(names, _capture(calls, kernels))]


def _swiglu_launches(width: int, dtype: torch.dtype, num_rows: int):
    h = torch.empty(num_rows, 2 * width, device="meta", dtype=dtype)
    g = torch.empty(num_rows, device="meta", dtype=dtype)

    def calls():
        triton_swiglu.swiglu_forward(h, g)
        triton_swiglu.swiglu_backward_fused(h, g, h.new_empty(num_rows, width))

    launches = _capture(calls, {triton_swiglu: ("_fwd_kernel", "_bwd_kernel")})
    return [(name, *rest) for name, (_, *rest) in zip(["swiglu fwd", "swiglu bwd"], launches)]


def compile_sm90(jit_fn, args, kwargs: dict, num_warps: int, num_stages: int | None) -> tuple[int, int, int]:
    """Compile one launch for sm_90 with the runtime's specialisation; (registers, spilled bytes,
    shared bytes)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget

    values = dict(zip(jit_fn.arg_names, args), **kwargs)
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(jit_fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name], attrs[(i,)] = "*" + _TYPES[v.dtype], [["tt.divisibility", 16]]
        else:
            kind, attr = native_specialize_impl(BaseBackend, v, False, True, True)
            sig[p.name] = kind
            if kind == "constexpr":
                consts[p.name] = attr
            elif attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    src = triton.compiler.ASTSource(fn=jit_fn, signature=sig, constexprs=consts, attrs=attrs)
    cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cc.asm["cubin"])
        f.flush()
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    num = {k: int(re.search(rf"{k}:(\d+)", res).group(1)) for k in ("REG", "STACK", "LOCAL")}
    return num["REG"], num["STACK"] + num["LOCAL"], cc.metadata.shared


def _resources(name: str, width: int, dtype: torch.dtype, kernel, args, kwargs) -> Iterator[Resources]:
    """Every config the autotuner would try for this launch (after its dtype pruning), or the one
    config of a plain kernel."""
    kwargs = dict(kwargs)
    if not isinstance(kernel, triton.runtime.Autotuner):
        warps = kwargs.pop("num_warps", 4)
        consts = {k: v for k, v in kwargs.items() if k.isupper()}
        yield Resources(name, width, _TYPES[dtype], ", ".join(f"{k}={v}" for k, v in consts.items()) + f" w{warps}",
                        *compile_sm90(kernel, args, kwargs, warps, None))
        return
    configs = kernel.early_config_prune(kernel.configs, dict(zip(kernel.arg_names, args))) \
        if kernel.early_config_prune else kernel.configs
    jit_fn, heuristics = kernel.fn, {}
    if isinstance(jit_fn, triton.runtime.Heuristics):
        heuristics, jit_fn = jit_fn.values, jit_fn.fn
    for c in configs:
        values = dict(zip(jit_fn.arg_names, args), **kwargs, **c.kwargs)
        full = {**kwargs, **c.kwargs, **{k: h(values) for k, h in heuristics.items()}}
        label = ", ".join(f"{k}={v}" for k, v in sorted(c.kwargs.items())) + f" w{c.num_warps} s{c.num_stages}"
        yield Resources(name, width, _TYPES[dtype], label, *compile_sm90(jit_fn, args, full, c.num_warps, c.num_stages))


def report(d_model: int, widths: list[int], dtypes: list[torch.dtype], num_tokens: int = 4096,
           num_experts: int = 8, top_k: int = 2) -> Iterator[Resources]:
    """Resources of every launch, config, width and dtype; plain kernels (combine, SwiGLU) once
    per dtype, since their widths are runtime arguments."""
    for dtype in dtypes:
        seen_plain = set()
        for width in widths:
            launches = _expert_launches(d_model, width, dtype, num_tokens, num_experts, top_k)
            launches += _swiglu_launches(width, dtype, num_tokens * top_k)
            for name, kernel, args, kwargs in launches:
                if not isinstance(kernel, triton.runtime.Autotuner):
                    if name in seen_plain:
                        continue
                    seen_plain.add(name)
                yield from _resources(name, width, dtype, kernel, args, kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--widths", default="128,256,512,1024,4096", help="expert widths F, comma list")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="operand dtypes, comma list")
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",") if w]
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    t0 = time.perf_counter()
    print(f"sm_90 (H100) resources, triton {triton.__version__}, D={args.d_model}")
    print(f"{'launch':11s} {'F':>5s} {'dtype':5s} {'config':44s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s}")
    problems = []
    for r in report(args.d_model, widths, dtypes):
        mark = f"  <- {r.problem}" if r.problem else ""
        print(f"{r.launch:11s} {r.width:5d} {r.dtype:5s} {r.config:44s} {r.registers:4d} {r.spilled:5d} "
              f"{r.shared / 1024:7.1f}{mark}", flush=True)
        if r.problem:
            problems.append(r)
    verdict = f"{len(problems)} config(s) would not run well" if problems else "every config fits: no spills"
    print(f"{verdict} ({time.perf_counter() - t0:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Forward+backward time of one MoE layer against a FLOP-matched dense SwiGLU FFN.

Every MoE point has k * g = 1, so it does the dense FFN's expert FLOPs plus a router. Dense and
MoE are timed alternately in one run (the machine is noisy) and each line prints the median
ratio MoE / dense, e.g. `1.07x`. Goal on a 2-core CPU: the fast path within 1.15x of dense.

    python bench/moe_layer.py                      # CPU, float32: reference and grouped
    python bench/moe_layer.py --device cuda --dtype bfloat16 --d-model 1024 --d-ff 4096 --paths grouped,triton

On CUDA the goal is the Triton path within 1.2x of dense (cuBLAS) at every granularity and
faster than the grouped-GEMM path; run both paths in one invocation to compare them side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from fractions import Fraction

import torch

from moe_core import ExpertSetConfig, ModelConfig, MoEConfig, build_model
from moe_core.layers import SwiGLU

POINTS = [("1", 8), ("1/4", 32), ("1/8", 64), ("1/8", 256), ("1/16", 1024)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(fn, x: torch.Tensor, grad: torch.Tensor) -> None:
    # As in training after `zero_grad(set_to_none=True)`: backward stores fresh gradients.
    for p in [x, *fn.params]:
        p.grad = None
    fn(x).backward(grad)


def time_pair(dense_fn, moe_fn, x, grad, repeats: int) -> tuple[float, float, float]:
    """Median seconds of dense and MoE fwd+bwd, alternating, and the median of per-pair ratios."""
    for fn in (dense_fn, moe_fn):  # warm-up
        _step(fn, x, grad)
    dense, moe = [], []
    for _ in range(repeats):
        for fn, out in ((dense_fn, dense), (moe_fn, moe)):
            _sync(x.device)
            t0 = time.perf_counter()
            _step(fn, x, grad)
            _sync(x.device)
            out.append(time.perf_counter() - t0)
    ratios = [m / d for m, d in zip(moe, dense)]
    return statistics.median(dense), statistics.median(moe), statistics.median(ratios)


def moe_layer(d_model: int, d_ff: int, g: str, n: int, backend: str, device, dtype):
    k = int(1 / Fraction(g))
    cfg = ModelConfig(
        vocab_size=2, d_model=d_model, n_layers=1, n_heads=1, d_ff=d_ff,
        moe=MoEConfig(layout="layerwise", experts=(ExpertSetConfig(num_experts=n, top_k=k, granularity=g),), backend=backend),
    )
    model = build_model(cfg).to(device=device, dtype=dtype)
    ffn, router, pool = model.blocks[0].ffn, model.routers[0], model.pools[0]

    def layer(x):
        return ffn(x, router, pool)[0]

    layer.params = list(model.parameters())
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paths", default=None, help="comma list of reference, grouped, triton "
                    "(default: reference,grouped on CPU; grouped,triton on CUDA)")
    args = ap.parse_args()
    args.paths = args.paths or ("grouped,triton" if args.device.startswith("cuda") else "reference,grouped")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    dense = SwiGLU(args.d_model, args.d_ff).to(device=device, dtype=dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense.params = list(dense.parameters())
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    print(f"T={args.tokens} d={args.d_model} d_ff={args.d_ff} {args.device} {args.dtype} threads={torch.get_num_threads()}")
    for path in args.paths.split(","):
        for g, n in POINTS:
            moe = moe_layer(args.d_model, args.d_ff, g, n, path, device, dtype)
            t_dense, t_moe, ratio = time_pair(dense, moe, x, grad, args.repeats)
            print(
                f"{path:9s} g={g:5s} n={n:5d} k={int(1 / Fraction(g)):3d}  "
                f"dense {t_dense * 1e3:8.1f} ms  moe {t_moe * 1e3:8.1f} ms  {ratio:.2f}x"
            )


if __name__ == "__main__":
    main()

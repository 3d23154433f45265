"""Training throughput of FLOP-matched MoEs against their dense model, in the project's trainer
(`train_trial`), eager and compiled (`train.compile`), in one run (variants alternate within each
round; medians of per-step tokens/s and MFU, warm-up steps skipped).

Variants: dense, MoE g=1/4 n=32 k=4 and MoE g=1/8 n=64 k=8 (k * g = 1: the dense FFN's FLOPs).

    python bench/train_throughput.py                     # CPU: small model, eager only
    python bench/train_throughput.py --modes eager,compiled --steps 6 --rounds 1
    python bench/train_throughput.py --device cuda       # GPU: d 768, 12 layers, seq 1024, 131k tokens/step,
                                                         # bf16 autocast (what the trainer does on CUDA),
                                                         # eager and compiled
    python bench/train_throughput.py --device cuda --backend triton --modes eager
    python bench/train_throughput.py --device cuda --router-dtype compute   # router matmul in bf16

Prints a line per (mode, variant) with tokens/s and MFU (and, compiled, the graphs dynamo compiled,
recompiles and graph breaks), then `ratio` lines: each MoE's tokens/s over dense's, per mode.
In eager mode a `layers` line per MoE point follows: its MoE FFN and the dense SwiGLU timed alone
(forward and backward, alternating, `bench/moe_layer.py`'s way) at the trainer's own shape (one
micro-batch of tokens), and the ratio the trainer would reach if the MoE layers' extra time were
the only difference (dense step + layers x micro-batches x extra): where it matches the measured
ratio, nothing outside the MoE layers costs the MoE anything. On CPU the line adds the streamed
path's expert GEMMs alone (`bench/moe_layer.py`'s `floor-c`: the six GEMMs chunk by chunk, in
cache, nothing else) and the ratio a MoE layer costing only those would give: a bound no removal
of overhead (router, gather, SwiGLU, combine) can pass.
Goals: CPU MoE at 0.85x of dense or better; the GPU numbers to beat are in shared/gpu/README.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

from moe_core.data.config import DataConfig
from moe_core.data.tokens import prepare_tokens
from moe_core.train.loop import train_trial
from moe_core.trial import TrialConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_layer as ml  # the layer bench beside this one

# Per-device defaults: CPU keeps the small model; CUDA is the trainer size of the GPU evidence.
SIZES = {
    "cpu": dict(d_model=256, layers=4, heads=4, kv_heads=2, d_ff=512, seq_len=256, batch_tokens=16384,
                micro_batch=16, vocab=4096, steps=8, rounds=2, modes="eager"),
    "cuda": dict(d_model=768, layers=12, heads=12, kv_heads=4, d_ff=3072, seq_len=1024, batch_tokens=131072,
                 micro_batch=32, vocab=8192, steps=20, rounds=1, modes="eager,compiled"),
}
MOE_POINTS = [("1/4", 32, 4), ("1/8", 64, 8)]


def trial(args: argparse.Namespace, moe: dict, compiled: bool) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": args.vocab, "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                  "n_kv_heads": args.kv_heads, "d_ff": args.d_ff, "seq_len": args.seq_len, "moe": moe},
        "train": {"steps": args.steps, "batch_tokens": args.batch_tokens, "micro_batch_size": args.micro_batch,
                  "eval_every": 10**9, "eval_tokens": args.seq_len, "log_routing_every": 0,
                  "compile": compiled, "device": args.device},
        "data": {"source": "bible", "tokenizer": "bpe", "bpe_vocab_size": args.vocab},
    })


def variants(backend: str, points: list[tuple[str, int, int]], router_dtype: str = "float32") -> dict[str, dict]:
    out = {"dense": {}}
    for g, n, k in points:
        out[f"moe g={g} n={n} k={k}"] = {"layout": "layerwise", "backend": backend, "router": {"dtype": router_dtype},
                                         "experts": [{"num_experts": n, "top_k": k, "granularity": g}]}
    return out


def _compile_report() -> str:
    """Graphs dynamo compiled, recompiles and graph breaks since the last `_reset_compile()`."""
    try:
        from torch._dynamo.utils import counters, get_compilation_metrics

        metrics = get_compilation_metrics()
        reasons = [m.recompile_reason for m in metrics if getattr(m, "recompile_reason", None)]
        breaks = sum(counters["graph_break"].values())
        text = f"  graphs {counters['stats']['unique_graphs']} recompiles {len(reasons)} graph-breaks {breaks}"
        if reasons:
            text += f"  (first: {' '.join(str(reasons[0]).split())[:100]})"
        return text
    except Exception as exc:  # noqa: BLE001 - private API; the count is a nicety
        return f"  (recompiles unknown: {type(exc).__name__})"


def _reset_compile() -> None:
    try:
        from torch._dynamo import reset
        from torch._dynamo.utils import clear_compilation_metrics, counters

        reset()
        counters.clear()
        clear_compilation_metrics()
    except Exception:  # noqa: BLE001
        pass


def parse_points(spec: str | None) -> list[tuple[str, int, int]]:
    if not spec:
        return MOE_POINTS
    points = []
    for item in spec.split(","):
        g, n, k = item.strip().split(":")
        points.append((g, int(n), int(k)))
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--kv-heads", type=int)
    ap.add_argument("--d-ff", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--batch-tokens", type=int)
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--vocab", type=int, help="model vocabulary and BPE vocabulary size")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default 8 on CPU, 20 on CUDA)")
    ap.add_argument("--skip", type=int, help="warm-up steps left out of the medians (default steps // 4, at least 1)")
    ap.add_argument("--rounds", type=int, help="runs of every variant, alternating (default 2 on CPU, 1 on CUDA)")
    ap.add_argument("--modes", help="comma list of eager, compiled (default: eager on CPU; eager,compiled on CUDA)")
    ap.add_argument("--compile", action="store_true", help="same as --modes eager,compiled")
    ap.add_argument("--backend", default="auto", help="moe.backend of the MoE variants (default auto)")
    ap.add_argument("--points", help="comma list of g:n:k MoE points (default 1/4:32:4,1/8:64:8)")
    ap.add_argument("--router-dtype", default="float32", choices=["float32", "compute"],
                    help="moe.router.dtype of the MoE variants (default float32)")
    ap.add_argument("--recompile-limit", type=int, help="torch._dynamo's recompile limit in compiled mode "
                    "(default: torch's, 8); each recompile of the model costs a full compile")
    args = ap.parse_args()
    for key, value in SIZES[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile:
        args.modes = "eager,compiled"
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"eager", "compiled"}:
        ap.error(f"--modes: unknown {sorted(set(modes) - {'eager', 'compiled'})}")
    skip = args.skip if args.skip is not None else max(1, args.steps // 4)
    if skip >= args.steps:
        ap.error(f"--skip {skip} leaves no step of --steps {args.steps} to measure")

    if args.recompile_limit is not None:
        from torch._dynamo import config as dynamo_config

        for key in ("recompile_limit", "cache_size_limit"):  # the newer name first
            if hasattr(dynamo_config, key):
                setattr(dynamo_config, key, args.recompile_limit)
                break
    data = prepare_tokens(DataConfig(source="bible", tokenizer="bpe", bpe_vocab_size=args.vocab))
    runs = variants(args.backend, parse_points(args.points), args.router_dtype)
    amp = "bf16 autocast" if args.device == "cuda" else "fp32"
    print(f"{args.device} {amp} d={args.d_model} layers={args.layers} heads={args.heads}/{args.kv_heads} "
          f"d_ff={args.d_ff} seq={args.seq_len} tokens/step={args.batch_tokens} micro={args.micro_batch} "
          f"vocab={args.vocab} steps={args.steps} (skip {skip}) rounds={args.rounds} backend={args.backend} "
          f"router={args.router_dtype} "
          f"torch {torch.__version__}", flush=True)

    for mode in modes:
        compiled = mode == "compiled"
        speeds = {name: [] for name in runs}
        mfu = {name: [] for name in runs}
        errors: dict[str, str] = {}
        medians = {}
        for round_ in range(args.rounds):
            for name, moe in runs.items():
                if name in errors:
                    continue
                if compiled:
                    _reset_compile()
                t0 = time.perf_counter()
                try:
                    with tempfile.TemporaryDirectory() as out:
                        train_trial(trial(args, moe, compiled), out, data=data)
                        table = pq.read_table(f"{out}/metrics.parquet").to_pydict()
                except Exception as exc:  # noqa: BLE001 - report and go on
                    errors[name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                    print(f"{mode:8s} {name:20s} ERROR {errors[name]}", flush=True)
                    continue
                finally:
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                speeds[name] += table["tokens_per_second"][skip:]
                mfu[name] += table["mfu"][skip:]
                if round_ == args.rounds - 1:  # the last round: print as soon as a variant is done
                    note = f"  run {time.perf_counter() - t0:.0f} s" + (_compile_report() if compiled else "")
                    medians[name] = statistics.median(speeds[name])
                    print(f"{mode:8s} {name:20s} {medians[name]:12,.0f} tokens/s  "
                          f"MFU {statistics.median(mfu[name]):.3f}{note}", flush=True)
        for name in runs:
            if name != "dense" and name in medians and "dense" in medians:
                print(f"ratio {mode:8s} {name} / dense {medians[name] / medians['dense']:.2f}x", flush=True)
        if mode == "eager" and "dense" in medians:
            for (g, n, k), name in zip(parse_points(args.points), [r for r in runs if r != "dense"]):
                print(layers_line(args, g, n, name, medians), flush=True)


def layers_line(args: argparse.Namespace, g: str, n: int, name: str, medians: dict[str, float]) -> str:
    """The MoE FFN against the dense SwiGLU alone at the trainer's micro-batch shape, and the
    trainer ratio their difference alone predicts (`medians`: tokens/s by variant)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what the trainer computes in
    tokens = args.micro_batch * args.seq_len
    torch.manual_seed(0)
    dense = ml.SwiGLU(args.d_model, args.d_ff).to(device=device, dtype=dtype)
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.02)
    dense.params = list(dense.parameters())
    x = torch.randn(tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    moe = ml.moe_layer(args.d_model, args.d_ff, g, n, args.backend, device, dtype, args.router_dtype)
    cases = {"dense": ml.layer_step(dense, x, grad), "moe": ml.layer_step(moe, x, grad)}
    if device.type == "cpu":  # the streamed path's own GEMMs, in cache: what no overhead removal goes below
        cases["floor"] = ml.cached_floor_step(tokens, args.d_model, args.d_ff, g, n, ml.CHUNK_BYTES)
    times, errors = ml.time_cases(cases, device, 5, 1)
    if errors:
        return f"layers   {name}  ERROR {errors}"
    t = {case: statistics.median(v) for case, v in times.items()}
    micro = args.batch_tokens // tokens  # micro-batches per step (one worker)
    dense_step = args.batch_tokens / medians["dense"]

    def predict(t_layer: float) -> float:  # the trainer's ratio if a MoE layer cost t_layer
        return dense_step / (dense_step + args.layers * micro * (t_layer - t["dense"]) / 1e3)

    measured = f", measured {medians[name] / medians['dense']:.2f}x" if name in medians else ""
    floor = ""
    if "floor" in t:
        floor = (f"; its expert GEMMs alone {t['floor']:.1f} ms (no gather, SwiGLU, combine or router), "
                 f"so at most {predict(t['floor']):.2f}x with no overhead at all")
    return (f"layers   {name}  T={tokens}: dense FFN {t['dense']:.1f} ms, MoE FFN {t['moe']:.1f} ms "
            f"({t['moe'] / t['dense']:.2f}x); the MoE layers alone predict {predict(t['moe']):.2f}x{measured}{floor}")


if __name__ == "__main__":
    main()

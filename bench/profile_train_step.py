"""Where a training step's time goes, dense against the FLOP-matched MoEs of bench/train_throughput.py.

Each variant trains a few warm-up steps in the project's trainer (`moe_core.train.loop`), then
`--steps` steps under torch.profiler (CPU activities; on CUDA also the device). Printed per
variant: wall time per step, the optimizer step, the expert kernel's total (the CPU `streamed`
path's autograd functions, GEMMs included), and the top ops by self time; then, per MoE point,
the ops whose self time differs most from dense's (ms per step, + where the MoE spends more).

    python bench/profile_train_step.py                 # CPU: the train_throughput CPU model, ~2 min
    python bench/profile_train_step.py --top 15 --steps 2

The profiler adds a few microseconds per op, so the MoE (hundreds of small GEMMs per layer)
reads slower here than in bench/train_throughput.py; compare the differences, not the totals.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt

from moe_core.data.config import DataConfig
from moe_core.data.tokens import prepare_tokens
from moe_core.train import loop

# Autograd functions of the expert computation whose total time (children included) is printed.
KERNEL_NAMES = ("StreamedExperts", "StreamedExpertsBackward")


def profile_variant(args: argparse.Namespace, moe: dict, data, warmup: int) -> tuple[float, dict[str, float], dict]:
    """(wall seconds per profiled step, self ms per step by op, total ms per step by op)."""
    trial = tt.trial(args, moe, False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with tempfile.TemporaryDirectory() as out:
        run = loop._set_up(trial, Path(out), [], data)
        run.model.train()
        for step in range(warmup):
            loop._step(run, step)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for step in range(warmup, warmup + args.profile_steps):
                loop._step(run, step)
        wall = (time.perf_counter() - start) / args.profile_steps
    events = prof.key_averages()
    per = 1e3 * args.profile_steps  # profiler times are microseconds
    self_ms = {e.key: e.self_cpu_time_total / per for e in events}
    total_ms = {e.key: e.cpu_time_total / per for e in events}
    return wall, self_ms, total_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", dest="profile_steps", type=int, default=3, help="profiled steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    for key, value in tt.SIZES[args.device].items():
        setattr(args, key, value)
    args.steps = args.warmup + args.profile_steps  # the trial's length: warm-up plus profiled steps
    data = prepare_tokens(DataConfig(source="bible", tokenizer="bpe", bpe_vocab_size=args.vocab))
    print(f"{args.device} d={args.d_model} layers={args.layers} d_ff={args.d_ff} seq={args.seq_len} "
          f"tokens/step={args.batch_tokens} micro={args.micro_batch} torch {torch.__version__}")
    results = {}
    for name, moe in tt.variants(args.backend, tt.MOE_POINTS).items():
        wall, self_ms, total_ms = profile_variant(args, moe, data, args.warmup)
        results[name] = self_ms
        kernel = sum(total_ms.get(k, 0.0) for k in KERNEL_NAMES)
        optim = sum(v for k, v in total_ms.items() if k.startswith("Optimizer.step"))
        print(f"\n{name}: {wall * 1e3:,.0f} ms/step wall (profiled), optimizer {optim:.0f} ms, "
              f"expert kernel {kernel:.0f} ms (GEMMs included)")
        for key, ms in sorted(self_ms.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {key[:52]:52s} {ms:8.1f} ms self")
    dense = results.pop("dense")
    for name, self_ms in results.items():
        diff = {k: self_ms.get(k, 0.0) - dense.get(k, 0.0) for k in set(self_ms) | set(dense)}
        print(f"\n{name} minus dense, self ms per step (total {sum(diff.values()):+.0f}):")
        for key, ms in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: args.top]:
            print(f"  {key[:52]:52s} {ms:+8.1f}")


if __name__ == "__main__":
    main()

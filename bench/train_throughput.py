"""Training throughput of a micro MoE (g = 1/4, S = 8) against its FLOP-matched dense model,
in the same trainer and the same run (alternating, medians of per-step tokens/s).

    python bench/train_throughput.py            # CPU; goal: MoE at 0.85x of dense or better
    python bench/train_throughput.py --d-model 768 --layers 12 --d-ff 3072 --seq-len 1024  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from moe_core.data.config import DataConfig
from moe_core.data.tokens import prepare_tokens
from moe_core.train.loop import train_trial
from moe_core.trial import TrialConfig


def trial(args: argparse.Namespace, moe: dict) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": {"vocab_size": 4096, "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
                  "n_kv_heads": max(1, args.heads // 2), "d_ff": args.d_ff, "seq_len": args.seq_len, "moe": moe},
        "train": {"steps": args.steps, "batch_tokens": args.batch_tokens, "micro_batch_size": args.micro_batch,
                  "eval_every": 10**9, "eval_tokens": args.seq_len, "log_routing_every": 0},
        "data": {"source": "bible", "tokenizer": "bpe", "bpe_vocab_size": 4096},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data = prepare_tokens(DataConfig())
    variants = {
        "dense": {},
        "moe g=1/4 S=8": {"layout": "layerwise", "experts": [{"num_experts": 32, "top_k": 4, "granularity": "1/4"}]},
    }
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    mfu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, moe in variants.items():
            with tempfile.TemporaryDirectory() as out:
                train_trial(trial(args, moe), out, data=data)
                import pyarrow.parquet as pq

                table = pq.read_table(f"{out}/metrics.parquet").to_pydict()
            speeds[name] += table["tokens_per_second"][2:]  # skip warm-up steps
            mfu[name] += table["mfu"][2:]
    dense, moe = (statistics.median(speeds[n]) for n in variants)
    for name in variants:
        print(f"{name:14s} {statistics.median(speeds[name]):10,.0f} tokens/s  MFU {statistics.median(mfu[name]):.3f}")
    print(f"ratio moe/dense {moe / dense:.2f}x (goal >= 0.85x)")


if __name__ == "__main__":
    main()

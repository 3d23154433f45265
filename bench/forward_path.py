"""How many files a reader crosses following one MoE forward: the readability measure of the MoE
layer's seams.

Traces one eager forward of a small MoE model (Python calls only, `sys.setprofile`) and reads it
as a reader would: every `moe_core` function once, in the order the forward first calls it. It
prints the files of that reading path, how often the path changes file, and how many of those
changes go back into a file already left (a reader's "returns"), with the functions read in
each file.

    python bench/forward_path.py [--backend grouped] [--layout layerwise] [--router-block 1]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moe_core import ModelConfig, MoEConfig, build_model  # noqa: E402

PACKAGE = ROOT / "moe_core"


def trace_forward(model: torch.nn.Module, idx: torch.Tensor) -> list[str]:
    """The file of each `moe_core` function `model(idx)` calls, once per function, in order of
    first call (files relative to the package; other packages' functions are skipped)."""
    visits: list[str] = []
    seen: set = set()

    def profile(frame, event, arg):
        if event != "call":
            return
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(PACKAGE) and frame.f_code not in seen:
            seen.add(frame.f_code)
            visits.append(str(path.relative_to(PACKAGE)))

    sys.setprofile(profile)
    try:
        model(idx)
    finally:
        sys.setprofile(None)
    return visits


def summarize(visits: list[str]) -> tuple[list[str], int, int, Counter]:
    """(files in order of first entry, changes of file, returns into a file already left,
    functions per file)."""
    files: list[str] = []
    changes = returns = 0
    entries: Counter = Counter(visits)
    left: set[str] = set()
    current = None
    for f in visits:
        if f == current:
            continue
        if current is not None:
            changes += 1
            left.add(current)
        if f in left:
            returns += 1
        if f not in files:
            files.append(f)
        current = f
    return files, changes, returns, entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="grouped")
    parser.add_argument("--layout", default="layerwise", choices=("layerwise", "unipool"))
    parser.add_argument("--router-block", type=int, default=1)
    args = parser.parse_args()
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16,
                      moe=MoEConfig(experts=[{"num_experts": 4, "top_k": 2, "granularity": 1.0}],
                                    backend=args.backend, layout=args.layout,
                                    router={"block_size": args.router_block}))
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    model(idx)  # the first forward imports and caches; trace the second
    files, changes, returns, entries = summarize(trace_forward(model, idx))
    print(f"one eager forward ({args.backend}, {args.layout}, router block {args.router_block}, 2 MoE layers):")
    print(f"  reading path: {len(files)} files, {changes} changes of file, {returns} back into a file already left")
    for f in files:
        print(f"  {entries[f]:3d} functions in {f}")


if __name__ == "__main__":
    main()

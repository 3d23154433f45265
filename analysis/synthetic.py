"""Synthetic result tables in the schema of docs/results.md, with planted effects (or none), for
testing the findings and trying the report without running sweeps.

Each study axis is a small designed sweep; the loss is a base per scale plus the planted terms
plus Gaussian seed noise. With `planted=False` every term is zero except noise, so no finding
should be reported as reproduced except "balancing is robust" (no effect is what it claims).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

SCALES = {"syn-s": (1_000_000, 2.0, 2.0 ** -1), "syn-m": (4_000_000, 1.7, 2.0 ** -3)}  # active, base loss, best g


def _row(sweep: str, scale: str, seed: int, **kw) -> dict:
    active, _, _ = SCALES[scale]
    s, g = kw.get("sparsity", 1.0), kw.get("granularity", 1.0)
    layout = kw.get("layout", "layerwise")
    k = 0 if layout == "dense" else max(1, round(1 / g))
    row = {
        "sweep": sweep, "status": "completed", "scale": scale, "seed": seed, "layout": layout, "sparsity": s,
        "num_experts": int(s * k), "top_k": k, "granularity": g, "expert_sets": 0 if layout == "dense" else 1,
        "expert_width": int(512 * g), "shared_experts": 0, "shared_granularity": 0.0, "pool_group_size": None,
        "router_scoring": None if layout == "dense" else "softmax", "router_block_size": None if layout == "dense" else 1,
        "capacity_factor": None, "aux_weight": 0.01, "aux_scope": "micro_batch", "pool_weight": 0.0, "z_weight": 0.001,
        "bias_rate": 0.0, "lr": 1e-3, "batch_tokens": 8192, "train_tokens": 20 * active, "data_source": "synthetic",
        "d_model": 128, "n_layers": 4, "active_params": active, "probe_loss_increase": None,
    }
    row.update(kw)
    row["total_params"] = int(active * (1 + 2 * (row["sparsity"] - 1) / 3)) if layout != "dense" else active
    row["train_flops"] = 6.0 * active * row["train_tokens"]
    return row


def synthetic_trials(planted: bool = True, seeds: int = 3, noise: float = 0.003, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, steps) tables. Planted effects: loss falls 0.02 per doubling of S; granularity
    costs 0.03 per squared octave away from a best g that depends on the scale only; dropping
    costs 0.02/CF; MoE loses 0.05 to dense at the smallest budget and wins 0.05 at the largest;
    UniPool wins 0.03 at a full pool, shrinking with the pool; shared experts, heterogeneous
    sets and balancing move loss by under 0.003, a generalist expert costs 0.03; PathMoE B = 4
    wins 0.02 with overlap rising with B; random routing costs UniPool 0.3 and vanilla 0.1."""
    rng = np.random.default_rng(seed)
    e = 1.0 if planted else 0.0
    rows, steps = [], []

    def add(sweep: str, scale: str, effect: float, **kw) -> None:
        for sd in range(seeds):
            r = _row(sweep, scale, sd, **kw)
            r["val_loss"] = SCALES[scale][1] + e * effect + rng.normal(0, noise)
            r["trial_id"] = f"{sweep}-{len(rows):05d}"
            rows.append(r)

    def g_cost(scale: str, g: float) -> float:
        return 0.03 * (math.log2(g) - math.log2(SCALES[scale][2])) ** 2

    for scale in SCALES:
        for s, g in itertools.product([1, 2, 4, 8, 16, 32], [1.0, 0.25]):
            add("expert-count", scale, -0.02 * math.log2(s) + g_cost(scale, g), sparsity=float(s), granularity=g)
        for s, g in itertools.product([4, 16], [1.0, 0.5, 0.25, 0.125, 0.0625]):
            add("granularity", scale, -0.02 * math.log2(s) + g_cost(scale, g), sparsity=float(s), granularity=g)
        base = -0.02 * 3 + g_cost(scale, 0.125)
        for k_s, g_s in [(0, 0.0), (1, 0.125), (1, 0.25), (1, 0.5)]:
            eff = base + (0.03 if g_s >= 0.5 else 0.002 * k_s)
            add("shared", scale, eff, sparsity=8.0, granularity=0.125, shared_experts=k_s, shared_granularity=g_s,
                top_k=8 - int(k_s * g_s * 8))
        for sets in (1, 2):
            add("hetero", scale, base + 0.001 * (sets - 1), sparsity=8.0, granularity=0.125, expert_sets=sets)
        for aux, bias in itertools.product([0.0, 0.01, 0.1], [0.0, 0.001, 0.01]):
            add("balancing", scale, base + 0.002 * aux * 10 + (0.02 if bias == 0.01 else 0.0) * 0.1,
                sparsity=8.0, granularity=0.125, aux_weight=aux, bias_rate=bias)
        for cf in (None, 1.0, 1.25, 2.0):
            add("dropping", scale, base + (0.02 / cf if cf else 0.0), sparsity=8.0, granularity=0.125, capacity_factor=cf)
        for i, tokens in enumerate([2, 10, 50]):
            active = SCALES[scale][0]
            add("threshold", scale, 0.0, layout="dense", train_tokens=tokens * active)
            add("threshold", scale, 0.05 - 0.05 * i, sparsity=8.0, granularity=0.125, train_tokens=tokens * active)
        vanilla = -0.02 * 3 + g_cost(scale, 1.0)  # the expert-count sweep's S = 8, g = 1 trial
        add("unipool", scale, vanilla, sparsity=8.0, granularity=1.0, probe_loss_increase=0.1 + rng.normal(0, 0.005))
        for frac in (0.5, 0.75, 1.0):
            add("unipool", scale, vanilla - 0.03 * (2 * frac - 1), layout="unipool", sparsity=8.0 * frac, granularity=1.0,
                router_scoring="norm", aux_weight=0.0, pool_weight=0.01,
                probe_loss_increase=0.1 + e * 0.2 + rng.normal(0, 0.005))
        for b, aux in itertools.product([1, 2, 4], [0.0, 0.01]):
            start = len(rows)
            add("pathmoe", scale, -0.01 * math.log2(b), sparsity=4.0, granularity=0.25, router_block_size=b, aux_weight=aux)
            for r in rows[start:]:
                for step in (10, 20):
                    steps.append({"trial_id": r["trial_id"], "step": step,
                                  "routing/jaccard": 0.4 + e * 0.1 * math.log2(b) + rng.normal(0, 0.01),
                                  "routing/entropy": 2.0 - e * 0.1 * math.log2(b) + rng.normal(0, 0.01)})
    return pd.DataFrame(rows), pd.DataFrame(steps)

"""Synthetic result tables in the schema of docs/results.md, with planted effects (or none), for
testing the findings and trying the report without running sweeps.

Each study axis is a small designed sweep (a `*_sweep` function adding to a `SweepBuilder`); the
loss is a base per scale plus the planted terms plus Gaussian seed noise. The sweeps' keyword
arguments are the planted effects, defaulting to what the papers report, so a test can plant an
effect that breaks one of a finding's conditions. With `planted=False` every term is zero except
noise, so no finding should be reported as reproduced.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

import numpy as np
import pandas as pd

SCALES = {"syn-s": (1_000_000, 2.0, 2.0 ** -1), "syn-m": (4_000_000, 1.7, 2.0 ** -3)}  # active, base loss, best g
ROUTING_BASE = {"max_load": 1.2, "jaccard": 0.4, "entropy": 2.0}  # routing/<stat> before planted offsets
PROBE_BASE = 0.1  # probe_loss_increase before planted offsets


def trial_row(sweep: str, scale: str, seed: int, **kw) -> dict:
    """One trials-table row; `kw` overrides any column. Top-k follows k g + K_s g_s = 1 and the
    routed count n = S k unless given; total parameters count the FFN as 2/3 of the active ones,
    its total width (in dense widths) being S k g + K_s g_s."""
    active = kw.get("active_params", SCALES[scale][0])
    layout = kw.get("layout", "layerwise")
    g, k_s, g_s = kw.get("granularity", 1.0), kw.get("shared_experts", 0), kw.get("shared_granularity", 0.0)
    k = 0 if layout == "dense" else kw.get("top_k", max(1, round((1 - k_s * g_s) / g)))
    n = kw.get("num_experts", round(kw.get("sparsity", 1.0) * k))
    row = {
        "sweep": sweep, "status": "completed", "scale": scale, "seed": seed, "layout": layout,
        "sparsity": n / k if k else 1.0, "num_experts": n, "top_k": k, "granularity": g,
        "expert_sets": 0 if layout == "dense" else 1, "expert_width": int(512 * g), "shared_experts": 0,
        "shared_granularity": 0.0, "pool_group_size": None, "router_scoring": None if layout == "dense" else "softmax",
        "router_block_size": None if layout == "dense" else 1, "router_dtype": None if layout == "dense" else "float32",
        "capacity_factor": None, "aux_weight": 0.01, "aux_scope": "micro_batch", "pool_weight": 0.0, "z_weight": 0.001,
        "bias_rate": 0.0, "lr": 1e-3, "batch_tokens": 8192, "train_tokens": 20 * active, "data_source": "synthetic",
        "d_model": 128, "n_layers": 4, "active_params": active, "probe_loss_increase": None,
    }
    row.update(kw)
    width = row["sparsity"] * row["top_k"] * row["granularity"] + row["shared_experts"] * row["shared_granularity"]
    row.setdefault("total_params", int(active * (1 + 2 * (width - 1) / 3)) if layout != "dense" else active)
    row["train_flops"] = 6.0 * active * row["train_tokens"]
    return row


class SweepBuilder:
    """Collects trials (one row per seed) and their steps rows; planted effects scale by `planted`."""

    def __init__(self, seeds: int = 3, noise: float = 0.003, seed: int = 0, planted: bool = True):
        self.seeds, self.noise, self.scale = seeds, noise, 1.0 if planted else 0.0
        self.rng = np.random.default_rng(seed)
        self.rows: list[dict] = []
        self.steps: list[dict] = []

    def add(self, sweep: str, scale: str, effect: float, probe: float | None = None,
            routing: dict[str, float] | None = None, **kw) -> None:
        """Trials of one setting: val_loss = the scale's base + `effect` + noise; `probe`: the probe
        loss increase over PROBE_BASE (same noise); `routing`: offsets of routing/<stat> over
        ROUTING_BASE, logged at steps 10 and 20."""
        for sd in range(self.seeds):
            r = trial_row(sweep, scale, sd, **kw)
            r["trial_id"] = f"{sweep}-{len(self.rows):05d}"
            r["val_loss"] = SCALES[scale][1] + self.scale * effect + self.rng.normal(0, self.noise)
            if probe is not None:
                r["probe_loss_increase"] = PROBE_BASE + self.scale * probe + self.rng.normal(0, self.noise)
            for step in (10, 20) if routing else ():
                stats = {f"routing/{k}": ROUTING_BASE[k] + self.scale * v + self.rng.normal(0, 0.01)
                         for k, v in routing.items()}
                self.steps.append({"trial_id": r["trial_id"], "step": step, **stats})
            self.rows.append(r)

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        steps = pd.DataFrame(self.steps) if self.steps else pd.DataFrame(columns=["trial_id", "step"])
        return pd.DataFrame(self.rows), steps


def g_cost(g: float, best: float) -> float:
    """Loss cost of granularity g: 0.03 per squared octave away from the best g."""
    return 0.03 * (math.log2(g) - math.log2(best)) ** 2


def scale_best_g(scale: str, sparsity: float) -> float:
    """The paper's best g: a function of the active size (the scale) only."""
    return SCALES[scale][2]


def _base(scale: str, sparsity: float = 8.0) -> float:
    """The planted loss of the g = 1/8 MoE (S = 8 unless given) the minor-factor sweeps start from."""
    return -0.02 * math.log2(sparsity) + g_cost(0.125, SCALES[scale][2])


def expert_count_sweep(b: SweepBuilder, per_doubling: float = -0.02, sparsities: Iterable[int] = (1, 2, 4, 8, 16, 32),
                       scales: Iterable[str] = SCALES, active_growth: float = 0.0) -> None:
    """Loss changes by `per_doubling` per doubling of S; `active_growth` > 0 also grows the active
    parameters with S (no longer at fixed active). Every trial of a scale trains on its tokens."""
    for scale, s, g in itertools.product(scales, sparsities, (1.0, 0.25)):
        active = int(SCALES[scale][0] * (1 + active_growth * math.log2(s)))
        b.add("expert-count", scale, per_doubling * math.log2(s) + g_cost(g, SCALES[scale][2]), sparsity=float(s),
              granularity=g, active_params=active, train_tokens=20 * SCALES[scale][0])


def granularity_sweep(b: SweepBuilder, best_g: Callable[[str, float], float] = scale_best_g,
                      scales: Iterable[str] = SCALES) -> None:
    """g from 1 to 1/16 at S = 4 and 16; the best g is `best_g(scale, S)`."""
    for scale, s, g in itertools.product(scales, (4, 16), (1.0, 0.5, 0.25, 0.125, 0.0625)):
        effect = -0.02 * math.log2(s) + g_cost(g, best_g(scale, s))
        b.add("granularity", scale, effect, sparsity=float(s), granularity=g)


SHARED_VARIANTS = ((0, 0.0), (1, 0.125), (1, 0.25), (1, 0.5))  # (K_s, g_s); (0, 0) is the plain MoE


def shared_sweep(b: SweepBuilder, generalist_cost: float = 0.03, shared_cost: float = 0.002, matched_total: bool = True,
                 variants: Iterable[tuple[int, float]] = SHARED_VARIANTS, scales: Iterable[str] = SCALES) -> None:
    """Shared experts at S = 8, g = 1/8. Matched total: the routed count is raised so that total
    parameters equal the plain MoE's (n g + K_s g_s = 8); otherwise n = 8 k and the total drops."""
    for scale, (k_s, g_s) in itertools.product(scales, variants):
        k = round((1 - k_s * g_s) * 8)
        n = round((8 - k_s * g_s) * 8) if matched_total else 8 * k
        effect = _base(scale) + (generalist_cost if g_s >= 0.5 else shared_cost * k_s)
        b.add("shared", scale, effect, granularity=0.125, top_k=k, num_experts=n, shared_experts=k_s,
              shared_granularity=g_s)


def hetero_sweep(b: SweepBuilder, scales: Iterable[str] = SCALES) -> None:
    """One vs two expert sets at S = 8, g = 1/8: a 0.001 difference."""
    for scale, sets in itertools.product(scales, (1, 2)):
        b.add("hetero", scale, _base(scale) + 0.001 * (sets - 1), sparsity=8.0, granularity=0.125, expert_sets=sets)


# An aux x bias grid with 11 settings between the failure modes (aux 0 with two bias rates, three
# aux weights with three), for judging "robust" over many settings.
MANY_AUX, MANY_BIAS = (0.0, 1e-3, 1e-2, 1e-1), (0.0, 1e-3, 3e-3, 1e-1)


def balancing_sweep(b: SweepBuilder, low_aux_cost: float = 0.02, low_aux_load: float = 2.0,
                    high_bias_cost: Callable[[int], float] = lambda n: 0.01 * n / 64, spread: float = 0.002,
                    aux: Iterable[float] = (0.0, 1e-2, 1e-1), bias: Iterable[float] = (0.0, 1e-3, 1e-1),
                    off: dict[tuple[float, float], float] | None = None, sparsities: Iterable[int] = (8, 32),
                    scales: Iterable[str] = SCALES) -> None:
    """Aux weight x bias rate at S = 8 and 32 (64 and 256 experts). No aux and no bias costs
    `low_aux_cost` and raises the max load by `low_aux_load`; a bias rate above 1e-2 costs
    `high_bias_cost(n)`; the settings in between differ by at most `spread` (0.65 `spread` on the
    MANY grid), except that `off[(aux, bias)]` is added to those settings' loss."""
    for scale, s, a, u in itertools.product(scales, sparsities, aux, bias):
        if u > 1e-2:
            effect, load = high_bias_cost(8 * s), 0.3
        elif a < 1e-3 and u == 0:
            effect, load = low_aux_cost, low_aux_load
        else:
            effect, load = spread * (10 * a + 100 * u) / 2 + (off or {}).get((a, u), 0.0), 0.0
        b.add("balancing", scale, _base(scale, s) + effect, routing={"max_load": load}, sparsity=float(s),
              granularity=0.125, aux_weight=a, bias_rate=u)


def dropping_sweep(b: SweepBuilder, costs: dict[str, float] | None = None, factors: Iterable[float] = (1.0, 1.25, 2.0),
                   overflow_column: bool = True, scales: Iterable[str] = SCALES) -> None:
    """Dropless against capacity factors, per overflow option: costs[option] / CF over dropless.
    Without `overflow_column` the rows have no `overflow` (tables written before it existed)."""
    costs = {"drop": 0.02, "default_expert": 0.015} if costs is None else costs
    for scale in scales:
        b.add("dropping", scale, _base(scale), sparsity=8.0, granularity=0.125)
        for (option, cost), cf in itertools.product(costs.items(), factors):
            b.add("dropping", scale, _base(scale) + cost / cf, sparsity=8.0, granularity=0.125, capacity_factor=cf,
                  **({"overflow": option} if overflow_column else {}))


def threshold_sweep(b: SweepBuilder, moe_minus_dense: Iterable[float] = (0.05, 0.02, -0.05),
                    tokens_per_param: Iterable[int] = (2, 10, 50), dense_tokens_per_param: Iterable[int] | None = None,
                    scales: Iterable[str] = SCALES) -> None:
    """Dense and an S = 8 MoE at several token budgets: MoE - dense = `moe_minus_dense` per budget."""
    tokens = list(tokens_per_param)
    for scale in scales:
        active = SCALES[scale][0]
        for t in dense_tokens_per_param or tokens:
            b.add("threshold", scale, 0.0, layout="dense", train_tokens=t * active)
        for t, d in zip(tokens, moe_minus_dense):
            b.add("threshold", scale, d, sparsity=8.0, granularity=0.125, train_tokens=t * active)


UNIPOOL = {"layout": "unipool", "router_scoring": "norm", "aux_weight": 0.0, "pool_weight": 0.01}  # its recipe
REDUCED_POOLS = {0.25: 0.02, 5 / 12: -0.003, 0.5: -0.005, 2 / 3: -0.01}  # pool fraction -> loss - vanilla
POOL_GROUPS = {1: -0.005, 2: -0.01, 3: -0.012, 4: -0.02, 6: -0.018}  # G -> loss - vanilla


def unipool_sweep(b: SweepBuilder, full: float = -0.03, reduced: dict[float, float] = REDUCED_POOLS,
                  groups: dict[int, float] = POOL_GROUPS, no_pool_loss: float = 0.01, probe: float = 0.2,
                  pool_granularity: float = 1.0, scales: Iterable[str] = SCALES) -> None:
    """Vanilla (8 experts per layer, top-1, 12 layers) against UniPool: the full pool (M = 96)
    `full`, reduced pools, pools grouped by G layers, and a full pool without its pool loss
    (`no_pool_loss`); random routing costs the full pool `probe` more. `pool_granularity` != 1
    makes the pools differ from vanilla in more than the pool."""
    for scale in scales:
        vanilla = -0.02 * 3 + g_cost(1.0, SCALES[scale][2])
        b.add("unipool", scale, vanilla, probe=0.0, sparsity=8.0, granularity=1.0, n_layers=12)
        pool = dict(UNIPOOL, granularity=pool_granularity, n_layers=12)
        b.add("unipool", scale, vanilla + full, probe=probe, sparsity=8.0, num_experts=96, **pool)
        b.add("unipool", scale, vanilla + no_pool_loss, sparsity=8.0, num_experts=96, **dict(pool, pool_weight=0.0))
        for frac, d in reduced.items():
            b.add("unipool", scale, vanilla + d, sparsity=8.0 * frac, num_experts=round(96 * frac), **pool)
        for g, d in groups.items():
            b.add("unipool", scale, vanilla + d, sparsity=8.0, num_experts=8 * g, pool_group_size=g, **pool)


def pathmoe_sweep(b: SweepBuilder, per_doubling: float = -0.01, overlap: float = 0.1, probe: float = -0.02,
                  independent_no_aux_cost: float = 0.02, blocks: Iterable[int] = (1, 2, 4),
                  auxes: Iterable[float] = (0.0, 0.01), scales: Iterable[str] = SCALES) -> None:
    """Router block size B x aux weight at S = 4, g = 1/4: loss changes by `per_doubling` per
    doubling of B; independent routers (B = 1) without aux loss cost `independent_no_aux_cost`
    (the balancing finding's first failure mode); overlap rises and entropy falls by `overlap`
    per doubling; the routing probe's loss increase changes by `probe` per doubling."""
    for scale, blk, aux in itertools.product(scales, blocks, auxes):
        octaves = math.log2(blk)
        base = -0.02 * 2 + g_cost(0.25, SCALES[scale][2])  # B = 1 with aux is the granularity sweep's S = 4, g = 1/4
        effect = base + per_doubling * octaves + (independent_no_aux_cost if blk == 1 and aux == 0 else 0.0)
        b.add("pathmoe", scale, effect, probe=probe * octaves,
              routing={"jaccard": overlap * octaves, "entropy": -overlap * octaves},
              sparsity=4.0, granularity=0.25, router_block_size=blk, aux_weight=aux)


def synthetic_trials(planted: bool = True, seeds: int = 3, noise: float = 0.003,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, steps) tables of every sweep above with the papers' effects (or none). They also
    hold trials a finding must leave out: shared-expert variants whose total parameters dropped
    (planted to make generalists look helpful) and a UniPool full pool without its pool loss."""
    b = SweepBuilder(seeds=seeds, noise=noise, seed=seed, planted=planted)
    expert_count_sweep(b)
    granularity_sweep(b)
    shared_sweep(b)
    shared_sweep(b, generalist_cost=-0.04, matched_total=False, variants=SHARED_VARIANTS[1:])
    hetero_sweep(b)
    balancing_sweep(b)
    dropping_sweep(b)
    threshold_sweep(b)
    unipool_sweep(b)
    pathmoe_sweep(b)
    return b.tables()

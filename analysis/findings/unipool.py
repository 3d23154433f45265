"""Finding 7: UniPool's expert pool shared by all layers beats per-layer experts, still matches them
when reduced, and pools grouped by G layers sit between."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.findings.comparisons import all_but, last_routing, pair_trials, per_comparison, vanilla_moe
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge, noise_tolerance, sign_rule, signed_list,
)

# UniPool: pools of 41.6% to 66.7% of the vanilla expert budget are reported to match vanilla.
UNIPOOL_REDUCED_RANGE = (5 / 12, 2 / 3)
# UniPool's recipe moves these together (pool, NormRouter, pool loss instead of per-layer aux).
UNIPOOL_RECIPE = ["layout", "sparsity", "num_experts", "pool_group_size", "router_scoring", "aux_weight", "pool_weight"]


# A UniPool trial whose NormRouter gives more than this share of tokens no expert (every chosen
# score 0: `routing/silent_fraction`, last logged) has routers that died: the pool loss can push
# every normalised logit below 0, where ReLU passes no gradient back. Such a trial measures a
# broken model, not UniPool, so findings 7 and 9 say inconclusive instead of judging with it.
SILENT_LIMIT = 0.5


def silent_routers(df: pd.DataFrame, steps: pd.DataFrame) -> pd.DataFrame:
    """UniPool trials (trial_id, scale, silent_fraction) whose routers went silent."""
    last = last_routing(steps, ["silent_fraction"])
    if "silent_fraction" not in last:
        return pd.DataFrame(columns=["trial_id", "scale", "silent_fraction"])
    pool = df[df["layout"] == "unipool"][["trial_id", "scale"]].merge(last, on="trial_id")
    return pool[pool["silent_fraction"] > SILENT_LIMIT]


def guard_silent(f: Finding, df: pd.DataFrame, steps: pd.DataFrame) -> Finding:
    """A judged finding made inconclusive, with the reason first, if UniPool routers went silent."""
    silent = silent_routers(df, steps)
    if silent.empty:
        return f
    f.verdict = INCONCLUSIVE
    ranges = silent.groupby("scale")["silent_fraction"].agg(["min", "max"])
    f.summary = (f"not judged: the routers of {len(silent)} UniPool trial(s) went silent (NormRouter scores all "
                 f"0 for > {SILENT_LIMIT:.0%} of tokens; " + ", ".join(
                     f"{scale} {r['min']:.0%}-{r['max']:.0%}" for scale, r in ranges.iterrows())
                 + "); a longer run or a lower pool_weight may keep them alive; " + f.summary)
    return f


def _pool_kind(group_size: float, n_layers: float, fraction: float) -> str:
    if not pd.isna(group_size) and group_size < n_layers:
        return "per-layer pools" if group_size == 1 else "grouped pools"
    return "full pool" if math.isclose(fraction, 1.0, rel_tol=1e-6) else "reduced pool"


def unipool_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Each UniPool trial paired with each vanilla trial that differs in the pool alone (same
    seed, scale, top-k, granularity and training; UNIPOOL_RECIPE may differ) at the same or a
    larger per-layer sparsity: `pool_fraction` = UniPool's S over vanilla's, and its `kind`."""
    p = pair_trials(df[df["layout"] == "unipool"], vanilla_moe(df), all_but(*UNIPOOL_RECIPE))
    p = p[p["sparsity"] <= p["sparsity_ref"] * (1 + 1e-9)]
    p = p.assign(pool_fraction=p["sparsity"] / p["sparsity_ref"])
    return p.assign(kind=[_pool_kind(*v) for v in zip(p["pool_group_size"], p["n_layers"], p["pool_fraction"])])


def _full_pool_check(t: pd.DataFrame, noise: float | None) -> Check:
    """The full pool with its pool balance loss beats vanilla in every comparison (`sign_rule`); one
    without the pool loss is not UniPool's recipe and is only reported."""
    claim = "the full pool (M = vanilla experts per layer x layers, one pool) beats vanilla at every scale"
    full = t[(t["kind"] == "full pool") & (t["pool_weight"] > 0)]
    if full.empty:
        return Check(claim, NOT_TESTED, detail="no full-pool trial pairs with a vanilla one")
    off = t[(t["kind"] == "full pool") & (t["pool_weight"] <= 0)]
    detail = "UniPool - vanilla, paired by seed: " + signed_list(
        full, lambda r: f"{r['scale']} (pool weight {r['pool_weight']:g})", "delta")
    if len(off):
        detail += "; without the pool balance loss (reported, not judged): " + signed_list(
            off, lambda r: r["scale"], "delta")
    return Check(claim, sign_rule(list(zip(full["delta"], full["seeds"])), noise, -1), float(full["delta"].mean()),
                 detail)


def _reduced_check(t: pd.DataFrame, noise: float | None) -> Check:
    """Every one-pool UniPool of UNIPOOL_REDUCED_RANGE of the budget is no worse than vanilla
    beyond the noise. Reports the curve per scale and the smallest pool that matches."""
    lo, hi = UNIPOOL_REDUCED_RANGE
    claim = f"reduced pools of {lo:.1%}-{hi:.1%} of the budget still match vanilla"
    one = t[t["kind"].isin(["full pool", "reduced pool"]) & (t["pool_weight"] > 0)].sort_values("pool_fraction")
    one = one.assign(matches=[d <= noise_tolerance(noise, int(n)) for d, n in zip(one["delta"], one["seeds"])])
    smallest = {s: f"{g[g['matches']]['pool_fraction'].min():.3g}" if g["matches"].any() else "none"
                for s, g in one.groupby("scale")}
    curve = "; ".join(f"{s}: " + signed_list(g, lambda r: f"{r['pool_fraction']:.3g}", "delta")
                      + f" (smallest matching: {smallest[s]})" for s, g in one.groupby("scale"))
    inside = one[(one["pool_fraction"] >= lo - 1e-6) & (one["pool_fraction"] <= hi + 1e-6)]
    if inside.empty:
        return Check(claim, NOT_TESTED, required=False,
                     detail=f"no pool of that size; pool fraction -> loss - vanilla: {curve or 'none'}")
    return Check(claim, REPRODUCED if inside["matches"].all() else CONTRADICTED, float(inside["delta"].max()),
                 f"pool fraction -> loss - vanilla: {curve}", required=False)


def _grouped_check(t: pd.DataFrame, noise: float | None) -> Check:
    """Pools shared by groups of 1 < G < L layers sit between the full pool and vanilla (within
    the noise): full-pool delta - tol <= grouped delta <= tol. G = 1 (per-layer pools with
    UniPool's routing) is listed beside them."""
    claim = "pools grouped by G layers sit between the full pool and vanilla"
    match = ["scale", "pool_weight", "sparsity_ref", "aux_weight_ref"]
    full = t[(t["kind"] == "full pool") & (t["pool_weight"] > 0)]
    groups = t[t["kind"].isin(["grouped pools", "per-layer pools"]) & np.isclose(t["pool_fraction"], 1.0)
               & (t["pool_weight"] > 0)].sort_values("pool_group_size")
    judged = groups[groups["kind"] == "grouped pools"].merge(full[match + ["delta"]], on=match, suffixes=("", "_full"))
    if judged.empty:
        return Check(claim, NOT_TESTED, detail="no grouped pool pairs with vanilla and a full pool", required=False)
    tol = np.array([noise_tolerance(noise, int(n)) for n in judged["seeds"]])
    between = (judged["delta"] >= judged["delta_full"] - tol) & (judged["delta"] <= tol)
    listing = "; ".join(f"{s}: " + signed_list(g, lambda r: f"G={r['pool_group_size']:g}", "delta")
                        for s, g in groups.groupby("scale"))
    return Check(claim, REPRODUCED if between.all() else CONTRADICTED, float(judged["delta"].mean()),
                 f"loss - vanilla by pool group size: {listing}; full pool: "
                 + signed_list(full, lambda r: r["scale"], "delta"), required=False)


def unipool(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """UniPool against vanilla, only between trials that differ in the pool alone (paired by
    seed). Each kind of pool is its own comparison: the full pool (the verdict), reduced pools (a
    smaller fraction of the vanilla budget) and pools grouped by G layers (supporting), each pool
    weight separately; a full pool without the pool balance loss is not UniPool's recipe and is
    reported only."""
    cols = ["scale", "kind", "pool_group_size", "pool_fraction", "pool_weight", "sparsity_ref", "aux_weight_ref"]
    table = per_comparison(unipool_pairs(df), cols)
    f = Finding("unipool", "7. A shared expert pool beats per-layer experts",
                "UniPool's full pool beats vanilla MoE at every scale; pools of 41.6%-66.7% of the budget still match "
                "it; pools grouped by G layers sit between.", INCONCLUSIVE,
                "no sweep has both vanilla and UniPool trials at one scale", table, noise)
    if table.empty:
        return f
    f.checks = [_full_pool_check(table, noise), _reduced_check(table, noise), _grouped_check(table, noise)]
    f.table = table.drop(columns=["setting", "setting_ref"]).rename(columns={
        "delta": "unipool_minus_vanilla", "sparsity_ref": "vanilla_S", "aux_weight_ref": "vanilla_aux"})

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        one = table[table["kind"].isin(["full pool", "reduced pool"]) & (table["pool_weight"] > 0)]
        for scale, g in one.groupby("scale"):
            g = g.groupby("pool_fraction")["delta"].mean()
            ax.plot(g.index, g.values, marker="o", label=scale)
        ax.axhline(0, color="k", lw=0.8), ax.set_xlabel("pool size / vanilla expert budget")
        ax.set_ylabel("loss(UniPool) - loss(vanilla)"), ax.legend(fontsize=7)
    f.plot = plot
    return guard_silent(judge(f), df, steps)


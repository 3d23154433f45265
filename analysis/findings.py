"""The study's findings, each computed from the result tables with its evidence and a verdict.

Every finding compares only trials that differ in the factor it is about (`stats.controlled_groups`),
judges effects against the seed noise where the sweeps repeat seeds, and says `inconclusive` when
the tables do not hold the comparison or the effect is within the noise. Rules are stated in each
function's docstring; thresholds are deliberately simple so a reader can check them by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from analysis.stats import beyond_noise, completed, controlled_groups, mean_by, seed_noise, spearman

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"


@dataclass
class Finding:
    key: str
    title: str
    claim: str
    verdict: str
    summary: str  # the numbers behind the verdict, in a sentence or two
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    noise: float | None = None
    plot: Callable | None = None  # plot(fig) draws the figure


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _noise_text(noise: float | None) -> str:
    return f"seed noise (sd) {noise:.4f}" if noise is not None else "no repeated seeds: noise unknown"


def _moe(df: pd.DataFrame) -> pd.DataFrame:
    """Plain layer-wise MoEs: one expert set, no shared experts."""
    return df[(df["layout"] == "layerwise") & (df["expert_sets"].fillna(1) <= 1) & (df["shared_experts"].fillna(0) == 0)]


# -- 1 ----------------------------------------------------------------------------------------
def expert_count(df: pd.DataFrame, noise: float | None) -> Finding:
    """Loss vs total expert parameters at fixed active parameters. Per controlled group (a scale,
    a granularity, ...) with >= 3 sparsities: the slope of val_loss per doubling of total params
    and the share of consecutive S steps where loss falls. Reproduced: every group's slope < 0 and
    the drop from the smallest to the largest S is beyond the noise (without seeds: >= 2/3 of
    steps fall). Contradicted: a group whose loss rises beyond the noise (or <= 1/3 steps fall)."""
    rows, groups = [], controlled_groups(_moe(df), ["sparsity", "num_experts", "expert_width"], min_levels=3)
    for g in groups:
        by = g.groupby("sparsity").agg(val_loss=("val_loss", "mean"), total=("total_params", "mean"), n=("val_loss", "size"))
        slope = np.polyfit(np.log2(by["total"]), by["val_loss"], 1)[0]
        falls = float(np.mean(np.diff(by["val_loss"].to_numpy()) < 0))
        drop = float(by["val_loss"].iloc[-1] - by["val_loss"].iloc[0])
        rows.append({"scale": g["scale"].iloc[0], "granularity": g["granularity"].iloc[0], "S": f"{by.index.min():g}-{by.index.max():g}",
                     "slope_per_doubling": slope, "share_of_steps_falling": falls, "loss_change": drop,
                     "significant": beyond_noise(drop, noise, int(by["n"].min())), "_curve": by})
    table = pd.DataFrame(rows)
    f = Finding("expert_count", "1. Loss falls with total expert parameters",
                "At fixed active parameters, loss improves monotonically with total MoE parameters (up to S = 128).",
                INCONCLUSIVE, "no sweep varies the expert count at fixed active parameters", noise=noise)
    if table.empty:
        return f
    falling = (table["slope_per_doubling"] < 0) & (table["significant"].fillna(table["share_of_steps_falling"] >= 2 / 3))
    rising = (table["slope_per_doubling"] > 0) & (table["significant"].fillna(table["share_of_steps_falling"] <= 1 / 3))
    f.verdict = REPRODUCED if falling.all() else CONTRADICTED if rising.any() else INCONCLUSIVE
    per_scale = table.groupby("scale")["slope_per_doubling"].mean()
    f.summary = ("slope of val_loss per doubling of total parameters, by scale: "
                 + ", ".join(f"{s} {v:+.4f}" for s, v in per_scale.items())
                 + f"; {int(falling.sum())}/{len(table)} groups fall beyond the noise; {_noise_text(noise)}")
    f.table = table.drop(columns="_curve")

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            c = r["_curve"]
            ax.plot(c["total"], c["val_loss"], marker="o", label=f"{r['scale']} g={r['granularity']:g}")
        ax.set_xscale("log"), ax.set_xlabel("total parameters"), ax.set_ylabel("validation loss"), ax.legend(fontsize=7)
    f.plot = plot
    return f


# -- 2 ----------------------------------------------------------------------------------------
def best_granularity(df: pd.DataFrame, noise: float | None) -> Finding:
    """The best granularity depends on active parameters only. Per scale, g* (lowest loss) at
    each sparsity with >= 3 granularities. Reproduced: within every scale with >= 2 sparsities,
    g* moves by at most one factor of 2 as S (so total parameters) changes. Contradicted: it moves
    further and the losses at the two optima differ beyond the noise."""
    rows, curves = [], []
    for g in controlled_groups(_moe(df), ["granularity", "num_experts", "top_k", "expert_width"], min_levels=3):
        by = mean_by(g, "granularity").sort_index()
        curves.append((g["scale"].iloc[0], g["sparsity"].iloc[0], by))
        rows.append({"scale": g["scale"].iloc[0], "active_params": int(g["active_params"].iloc[0]),
                     "S": g["sparsity"].iloc[0], "best_g": float(by.idxmin()), "best_loss": float(by.min()),
                     "loss_range": float(by.max() - by.min())})
    table = pd.DataFrame(rows)
    f = Finding("granularity", "2. Best granularity depends on active parameters",
                "The optimal expert size depends on active parameters, not on total parameters.",
                INCONCLUSIVE, "no sweep varies granularity over >= 3 values", table, noise)
    if table.empty:
        return f
    if noise is not None and not any(beyond_noise(r, noise) for r in table["loss_range"]):
        f.summary = f"granularity moves loss by at most {table['loss_range'].max():.4f}, within the noise ({_noise_text(noise)})"
        return f
    consistent, judged = [], 0
    for scale, g in table.groupby("scale"):
        if g["S"].nunique() < 2:
            continue
        judged += 1
        spread = g["best_g"].max() / g["best_g"].min()
        ok = spread <= 2
        if not ok and noise is not None:
            ok = not beyond_noise(g["best_loss"].max() - g["best_loss"].min(), noise)
        consistent.append(ok)
    by_scale = table.groupby("scale")["best_g"].agg(lambda s: "/".join(f"{x:g}" for x in s))
    f.summary = "best g by scale (one per sparsity): " + "; ".join(f"{s}: {v}" for s, v in by_scale.items())
    if judged == 0:
        f.summary += "; only one sparsity per scale, so total parameters never vary at fixed active"
    else:
        f.verdict = REPRODUCED if all(consistent) else CONTRADICTED
        f.summary += f"; stable across S in {sum(consistent)}/{judged} scales"

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for scale, s, by in curves:
            ax.plot(by.index, by.values, marker="o", label=f"{scale} S={s:g}")
        ax.set_xscale("log", base=2), ax.set_xlabel("granularity g"), ax.set_ylabel("validation loss"), ax.legend(fontsize=7)
    f.plot = plot
    return f


# -- 3 ----------------------------------------------------------------------------------------
def _effect(df: pd.DataFrame, factors: list[str], primary: str | None, same_sweep: bool) -> tuple[float, int]:
    """Mean over controlled groups of the range of mean loss across the factors' levels."""
    ranges = [float(mean_by(g, factors).max() - mean_by(g, factors).min())
              for g in controlled_groups(df, factors, primary=primary, same_sweep=same_sweep)]
    return (float(np.mean(ranges)) if ranges else float("nan")), len(ranges)


def small_effects(df: pd.DataFrame, noise: float | None) -> Finding:
    """Shared experts, heterogeneous sets and balancing move loss less than expert count and
    granularity. Effect = mean range of loss across a factor's levels in controlled groups.
    Reproduced: the largest minor effect is below the smallest major effect. Generalist experts
    (shared, g_s >= 1/2) hurt: their loss minus the no-shared-expert trial, paired."""
    factors = {  # name: (columns that change together, the one that defines the factor, major?)
        "expert count (S)": (["sparsity", "num_experts", "expert_width"], "sparsity", True),
        "granularity": (["granularity", "num_experts", "top_k", "expert_width"], "granularity", True),
        "shared experts": (["shared_experts", "shared_granularity", "top_k", "num_experts"], "shared_granularity", False),
        "heterogeneous sets": (["expert_sets", "granularity", "num_experts", "top_k", "expert_width"], "expert_sets", False),
        "balancing (aux x bias)": (["aux_weight", "bias_rate"], None, False),
    }
    rows = []
    for name, (cols, primary, major) in factors.items():
        # Shared and heterogeneous variants change k, n and widths together: compare them only
        # with the plain MoE of the same sweep.
        effect, n = _effect(df, cols, primary, same_sweep=not major)
        rows.append({"factor": name, "kind": "major" if major else "minor", "effect": effect, "groups": n})
    table = pd.DataFrame(rows)
    major = table[(table["kind"] == "major") & (table["groups"] > 0)]["effect"]
    minor = table[(table["kind"] == "minor") & (table["groups"] > 0)]["effect"]
    gen = []
    for g in controlled_groups(df, ["shared_experts", "shared_granularity", "top_k", "num_experts"]):
        base = g[g["shared_experts"].fillna(0) == 0]["val_loss"].mean()
        big = g[(g["shared_experts"].fillna(0) > 0) & (g["shared_granularity"] >= 0.5)]["val_loss"].mean()
        if np.isfinite(base) and np.isfinite(big):
            gen.append(big - base)
    f = Finding("small_effects", "3. Shared experts, heterogeneous sets and balancing matter little",
                "Shared-expert size, heterogeneous experts and balancing settings have small effects; generalist experts hurt.",
                INCONCLUSIVE, "", table, noise)
    parts = [f"{r['factor']} {_fmt(r['effect'])} ({r['groups']} groups)" for r in rows if r["groups"]]
    f.summary = "mean loss range per factor: " + ", ".join(parts) if parts else "no controlled comparisons"
    if gen:
        f.summary += f"; generalist expert vs none: {np.mean(gen):+.4f} ({len(gen)} pairs)"
    if len(major) and len(minor) and noise is not None and not beyond_noise(major.min(), noise):
        f.summary += f"; expert count and granularity themselves move loss within the noise ({_noise_text(noise)})"
    elif len(major) and len(minor):
        f.verdict = REPRODUCED if minor.max() < major.min() else CONTRADICTED if minor.min() > major.max() else INCONCLUSIVE
    else:
        f.summary += "; needs both a major and a minor factor swept"

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        t = table[table["groups"] > 0]
        ax.barh(t["factor"], t["effect"], color=["tab:blue" if k == "major" else "tab:gray" for k in t["kind"]])
        ax.set_xlabel("mean range of validation loss across the factor's levels")
    f.plot = plot
    return f


# -- 4 ----------------------------------------------------------------------------------------
def dropless(df: pd.DataFrame, noise: float | None) -> Finding:
    """Dropless beats token dropping. Paired difference loss(capacity factor) - loss(dropless)
    in controlled groups. Reproduced: mean difference > 0, >= 2/3 of pairs positive, and the mean
    beyond the noise when known. Contradicted: mean < 0 with <= 1/3 of pairs positive."""
    rows = []
    for g in controlled_groups(df[df["layout"] != "dense"], ["capacity_factor"]):
        base = g[g["capacity_factor"].isna()]["val_loss"].mean()
        for cf, sub in g[g["capacity_factor"].notna()].groupby("capacity_factor"):
            if np.isfinite(base):
                rows.append({"scale": g["scale"].iloc[0], "S": g["sparsity"].iloc[0], "granularity": g["granularity"].iloc[0],
                             "capacity_factor": cf, "loss_minus_dropless": float(sub["val_loss"].mean() - base)})
    table = pd.DataFrame(rows)
    f = Finding("dropless", "4. Dropless routing beats token dropping",
                "Dropless routing gives a small, consistent gain over capacity-factor dropping.",
                INCONCLUSIVE, "no sweep pairs dropless with capacity-factor trials", table, noise)
    if table.empty:
        return f
    d = table["loss_minus_dropless"]
    pos = float((d > 0).mean())
    big = beyond_noise(d.mean(), noise)
    f.summary = (f"loss(dropping) - loss(dropless): mean {d.mean():+.4f} over {len(d)} pairs, {pos:.0%} positive; by capacity factor "
                 + ", ".join(f"{cf:g}: {v:+.4f}" for cf, v in table.groupby("capacity_factor")["loss_minus_dropless"].mean().items())
                 + f"; {_noise_text(noise)}")
    if d.mean() > 0 and pos >= 2 / 3 and big is not False:
        f.verdict = REPRODUCED
    elif d.mean() < 0 and pos <= 1 / 3:
        f.verdict = CONTRADICTED

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        m = table.groupby("capacity_factor")["loss_minus_dropless"]
        ax.bar([f"{c:g}" for c in m.mean().index], m.mean().values, yerr=m.std().fillna(0).values)
        ax.axhline(0, color="k", lw=0.8), ax.set_xlabel("capacity factor"), ax.set_ylabel("loss - loss(dropless)")
    f.plot = plot
    return f


# -- 5 ----------------------------------------------------------------------------------------
def compute_threshold(df: pd.DataFrame, noise: float | None) -> Finding:
    """The compute below which MoE loses to its dense baseline. Pairs: MoE and dense trials of the
    same scale, tokens and lr. Reproduced: MoE - dense > 0 at the smallest compute and < 0 at the
    largest (the threshold is where the sign changes). Contradicted: the opposite order.
    Inconclusive: one sign throughout (the threshold lies outside the budgets tested)."""
    rows = []
    keys = ["scale", "train_tokens", "lr", "batch_tokens", "data_source"]
    for _, g in df.groupby(keys, dropna=False):
        dense = g[g["layout"] == "dense"]["val_loss"].mean()
        if not np.isfinite(dense):
            continue
        for (s, gran), moe in g[g["layout"] == "layerwise"].groupby(["sparsity", "granularity"]):
            rows.append({"scale": g["scale"].iloc[0], "train_flops": float(g["train_flops"].iloc[0]), "S": s, "granularity": gran,
                         "moe_minus_dense": float(moe["val_loss"].mean() - dense)})
    table = pd.DataFrame(rows)
    f = Finding("threshold", "5. Below a compute threshold MoE loses to dense",
                "Below a compute threshold MoE underperforms its dense baseline (unless given more data).",
                INCONCLUSIVE, "no sweep has dense and MoE trials at equal scale and tokens", table, noise)
    if table.empty:
        return f
    by = table.groupby("train_flops")["moe_minus_dense"].mean().sort_index()
    wins = by[by < 0]
    clear = all(beyond_noise(v, noise) is not False for v in (by.iloc[0], by.iloc[-1]))
    if not clear:
        f.summary = f"MoE - dense stays within the noise at the smallest or largest budget ({_noise_text(noise)})"
    elif (by > 0).iloc[0] and (by < 0).iloc[-1]:
        later = by[by.index >= by[by > 0].index.max()]
        threshold = later[later < 0].index.min()
        f.verdict, f.summary = REPRODUCED, f"MoE loses below and wins above about {threshold:.3g} training FLOPs"
    elif (by < 0).iloc[0] and (by > 0).iloc[-1]:
        f.verdict, f.summary = CONTRADICTED, "MoE wins at small compute and loses at large compute"
    else:
        side = "wins" if len(wins) == len(by) else "loses" if wins.empty else "wins and loses without order"
        f.summary = f"MoE {side} at every budget tested ({by.index.min():.3g} to {by.index.max():.3g} FLOPs)"
        f.summary = f.summary if len(wins) in (0, len(by)) else f"MoE {side} across budgets"
    f.summary += "; MoE - dense by FLOPs: " + ", ".join(f"{x:.2g}: {v:+.3f}" for x, v in by.items())

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for (scale, s), g in table.groupby(["scale", "S"]):
            g = g.sort_values("train_flops")
            ax.plot(g["train_flops"], g["moe_minus_dense"], marker="o", label=f"{scale} S={s:g}")
        ax.axhline(0, color="k", lw=0.8), ax.set_xscale("log"), ax.set_xlabel("training FLOPs")
        ax.set_ylabel("loss(MoE) - loss(dense)"), ax.legend(fontsize=7)
    f.plot = plot
    return f


# -- 6 ----------------------------------------------------------------------------------------
def balancing(df: pd.DataFrame, noise: float | None) -> Finding:
    """Balancing is robust; a large loss-free bias rate hurts with many experts. Per controlled
    group over aux weight x bias rate (>= 2 levels of each): the loss range without the largest
    bias rate, and the change from the smallest to the largest bias rate. Reproduced (robust):
    every range is within the noise (without seeds: within 1% of the mean loss)."""
    rows, grids = [], []
    for g in controlled_groups(df[df["layout"] != "dense"], ["aux_weight", "bias_rate"], min_levels=4):
        if g["aux_weight"].nunique() < 2 or g["bias_rate"].nunique() < 2:
            continue
        grid = g.pivot_table(index="aux_weight", columns="bias_rate", values="val_loss", aggfunc="mean")
        top = grid.columns.max()
        rest = grid.drop(columns=top) if grid.shape[1] > 2 else grid
        rows.append({"scale": g["scale"].iloc[0], "num_experts": int(g["num_experts"].iloc[0]),
                     "range_without_top_bias": float(rest.max().max() - rest.min().min()),
                     "top_bias_minus_none": float(grid[top].mean() - grid[grid.columns.min()].mean()),
                     "mean_loss": float(g["val_loss"].mean())})
        grids.append((g["scale"].iloc[0], int(g["num_experts"].iloc[0]), grid))
    table = pd.DataFrame(rows)
    f = Finding("balancing", "6. Balancing settings are robust",
                "Balancing is robust up to 512 experts, but a large loss-free bias rate hurts with very many experts.",
                INCONCLUSIVE, "no sweep crosses aux weights with bias rates", table, noise)
    if table.empty:
        return f
    limit = (2 * noise) if noise is not None else 0.01 * table["mean_loss"]
    robust = table["range_without_top_bias"] <= limit
    f.verdict = REPRODUCED if robust.all() else INCONCLUSIVE if robust.any() else CONTRADICTED
    f.summary = ("loss range over aux x bias (largest bias rate left out), by expert count: "
                 + ", ".join(f"n={r['num_experts']}: {r['range_without_top_bias']:.4f}" for r in rows)
                 + "; largest bias rate minus none: " + ", ".join(f"n={r['num_experts']}: {r['top_bias_minus_none']:+.4f}" for r in rows)
                 + f"; {_noise_text(noise)}")

    def plot(fig):
        for i, (scale, n, grid) in enumerate(grids):
            ax = fig.add_subplot(1, len(grids), i + 1)
            im = ax.imshow(grid.values, cmap="viridis_r", aspect="auto")
            ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns], fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [f"{c:g}" for c in grid.index], fontsize=7)
            ax.set_xlabel("bias rate"), ax.set_ylabel("aux weight"), ax.set_title(f"{scale} n={n}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.05)
    f.plot = plot
    return f


# -- 7 ----------------------------------------------------------------------------------------
def unipool(df: pd.DataFrame, noise: float | None) -> Finding:
    """UniPool beats per-layer experts, even with a smaller expert budget. Per scale and trial
    setup (tokens, lr, granularity): vanilla (layerwise) loss against UniPool at each pool
    fraction (its per-layer sparsity over vanilla's). Reproduced: the full pool beats vanilla at
    every scale (beyond the noise when known). Reports the smallest fraction still matching vanilla."""
    rows = []
    keys = ["scale", "train_tokens", "lr", "granularity", "top_k"]
    for _, g in df.groupby(keys, dropna=False):
        van = g[g["layout"] == "layerwise"]
        pool = g[g["layout"] == "unipool"]
        if van.empty or pool.empty:
            continue
        s_van = pool["sparsity"].max()  # a full pool has the vanilla budget: the same S per layer
        v = van[np.isclose(van["sparsity"], s_van)]["val_loss"].mean()
        if not np.isfinite(v):
            continue
        for s, sub in pool.groupby("sparsity"):
            rows.append({"scale": g["scale"].iloc[0], "active_params": int(g["active_params"].iloc[0]),
                         "pool_fraction": float(s / s_van), "unipool_minus_vanilla": float(sub["val_loss"].mean() - v)})
    table = pd.DataFrame(rows)
    f = Finding("unipool", "7. A shared expert pool beats per-layer experts",
                "UniPool beats vanilla MoE at every scale, and pools of 41.6%-66.7% of the budget still match it.",
                INCONCLUSIVE, "no sweep has both vanilla and UniPool trials at one scale", table, noise)
    if table.empty:
        return f
    full = table[np.isclose(table["pool_fraction"], 1.0)].groupby("scale")["unipool_minus_vanilla"].mean()
    tol = 2 * noise if noise is not None else 0.0
    match = table[table["unipool_minus_vanilla"] <= tol].groupby("scale")["pool_fraction"].min()
    f.summary = ("UniPool (full pool) - vanilla by scale: " + ", ".join(f"{s}: {v:+.4f}" for s, v in full.items())
                 + "; smallest pool fraction matching vanilla: "
                 + (", ".join(f"{s}: {v:.3g}" for s, v in match.items()) if len(match) else "none") + f"; {_noise_text(noise)}")
    if len(full):
        wins = [(v < 0) and (beyond_noise(v, noise) is not False) for v in full]
        f.verdict = REPRODUCED if all(wins) else CONTRADICTED if all(v > 0 and beyond_noise(v, noise) is not False for v in full) else INCONCLUSIVE

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for scale, g in table.groupby("scale"):
            g = g.sort_values("pool_fraction")
            ax.plot(g["pool_fraction"], g["unipool_minus_vanilla"], marker="o", label=scale)
        ax.axhline(0, color="k", lw=0.8), ax.set_xlabel("pool size / vanilla expert budget")
        ax.set_ylabel("loss(UniPool) - loss(vanilla)"), ax.legend(fontsize=7)
    f.plot = plot
    return f


# -- 8 ----------------------------------------------------------------------------------------
def pathmoe(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """Routers shared by blocks of B layers. Per controlled group with >= 2 block sizes: loss by
    B, and from the steps table the last logged consecutive-layer overlap (routing/jaccard) and
    routing entropy. Reproduced: the best B is > 1 and overlap rises with B (rank correlation > 0)."""
    last = pd.DataFrame(columns=["trial_id", "jaccard", "entropy"])
    if not steps.empty and "routing/jaccard" in steps:
        s = steps.dropna(subset=["routing/jaccard"]).sort_values("step").groupby("trial_id").tail(1)
        last = s[["trial_id", "routing/jaccard", "routing/entropy"]].rename(columns={"routing/jaccard": "jaccard", "routing/entropy": "entropy"})
    rows = []
    moe = df[df["layout"] != "dense"].merge(last, on="trial_id", how="left")
    for g in controlled_groups(moe, ["router_block_size"]):
        for b, sub in g.groupby("router_block_size"):
            rows.append({"scale": g["scale"].iloc[0], "aux_weight": g["aux_weight"].iloc[0], "B": int(b),
                         "val_loss": float(sub["val_loss"].mean()), "seeds": len(sub), "jaccard": float(sub["jaccard"].mean()),
                         "entropy": float(sub["entropy"].mean())})
    table = pd.DataFrame(rows)
    f = Finding("pathmoe", "8. Routers shared across layers (PathMoE)",
                "Sharing routers over blocks of B layers improves on independent routing and makes paths more consistent.",
                INCONCLUSIVE, "no sweep varies the router block size", table, noise)
    if table.empty:
        return f
    verdicts = []
    for (scale, aux), g in table.groupby(["scale", "aux_weight"]):
        best = int(g.loc[g["val_loss"].idxmin(), "B"])
        rho = spearman(g["B"].to_numpy(), g["jaccard"].to_numpy())
        gain = float(g[g["B"] == g["B"].min()]["val_loss"].mean() - g["val_loss"].min())
        real = beyond_noise(gain, noise, int(g["seeds"].min())) is not False and gain > 0
        verdicts.append((best > 1 and real and (rho > 0 or math.isnan(rho)), best == 1 and rho < 0))
        f.summary += f"{scale} aux {aux:g}: best B = {best} (gain {gain:.4f} over B = 1), overlap vs B rank corr {_fmt(rho, 2)}; "
    f.summary = f.summary.replace("no sweep varies the router block size", "").strip("; ")
    f.verdict = REPRODUCED if all(v[0] for v in verdicts) else CONTRADICTED if all(v[1] for v in verdicts) else INCONCLUSIVE

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for (scale, aux), g in table.groupby(["scale", "aux_weight"]):
            g = g.sort_values("B")
            ax1.plot(g["B"], g["val_loss"], marker="o", label=f"{scale} aux={aux:g}")
            ax2.plot(g["B"], g["jaccard"], marker="o", label=f"{scale} aux={aux:g}")
        ax1.set_xlabel("router block size B"), ax1.set_ylabel("validation loss"), ax1.legend(fontsize=7)
        ax2.set_xlabel("router block size B"), ax2.set_ylabel("consecutive-layer overlap (Jaccard)")
    f.plot = plot
    return f


# -- 9 ----------------------------------------------------------------------------------------
def routing_probe(df: pd.DataFrame, noise: float | None) -> Finding:
    """Random routing in one deeper layer hurts UniPool more than vanilla MoE. Mean probe loss
    increase by layout. Reproduced: UniPool's increase is larger than vanilla's."""
    have = df[df["probe_loss_increase"].notna()] if "probe_loss_increase" in df else df.iloc[0:0]
    table = have.groupby(["scale", "layout"])["probe_loss_increase"].agg(["mean", "count"]).reset_index() if not have.empty else pd.DataFrame()
    f = Finding("probe", "9. Routing probe: UniPool's routing matters more",
                "Replacing one deeper layer's routing with random choice costs UniPool more than vanilla MoE.",
                INCONCLUSIVE, "no trial ran the routing probe (train.routing_probe)", table, noise)
    if table.empty:
        return f
    by = table.groupby("layout")["mean"].mean()
    f.summary = "mean loss increase under random routing: " + ", ".join(f"{k} {v:+.4f}" for k, v in by.items())
    if "unipool" in by and "layerwise" in by:
        diff = float(by["unipool"] - by["layerwise"])
        if beyond_noise(diff, noise) is False:
            f.summary += f"; the difference {diff:+.4f} is within the noise ({_noise_text(noise)})"
        else:
            f.verdict = REPRODUCED if diff > 0 else CONTRADICTED

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"{r['scale']}\n{r['layout']}" for _, r in table.iterrows()]
        ax.bar(labels, table["mean"]), ax.set_ylabel("loss increase, one layer routed at random")
    f.plot = plot
    return f


# -- scaling fit ------------------------------------------------------------------------------
def scaling_fit(df: pd.DataFrame, budget_flops: float | None = None) -> Finding:
    """Power law in active and total parameters with a granularity optimum that may move with
    active size: log L = c + a log Na + b log Nt + q (log g)^2 + r log g log Na, least squares
    over layer-wise MoE and dense trials. For a compute budget C (20 tokens per active parameter,
    C = 6 Na D) it predicts Na, the best g (where d/dlog g = 0) and whether more experts help (b < 0)."""
    d = df[df["layout"].isin(["layerwise", "dense"]) & (df["expert_sets"].fillna(1) <= 1)].copy()
    f = Finding("scaling", "Scaling fit", "Validation loss as a power law of active and total parameters.",
                INCONCLUSIVE, "fewer than 6 trials or a single active size", pd.DataFrame())
    if len(d) < 6 or d["active_params"].nunique() < 2:
        return f
    la, lt = np.log(d["active_params"].astype(float)), np.log(d["total_params"].astype(float))
    lg = np.log(d["granularity"].fillna(1.0).astype(float))
    X = np.column_stack([np.ones(len(d)), la, lt, lg**2, lg * la])
    y = np.log(d["val_loss"].astype(float))
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    pred = X @ coef
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12)
    c, a, b, q, r = coef
    budget = budget_flops or float(d["train_flops"].max()) * 10
    na = math.sqrt(budget / (6 * 20))
    g_best = math.exp(-r * math.log(na) / (2 * q)) if q > 0 else float("nan")
    f.table = pd.DataFrame([{"c": c, "a_active": a, "b_total": b, "q_logg2": q, "r_logg_logNa": r, "r2": r2, "points": len(d),
                             "budget_flops": budget, "pred_active_params": na, "pred_best_g": g_best}])
    f.verdict = "fit"
    f.summary = (f"log L = {c:.3f} {a:+.3f} log Na {b:+.3f} log Nt {q:+.4f} (log g)^2 {r:+.4f} log g log Na (R^2 {r2:.2f}, {len(d)} trials); "
                 f"at {budget:.2g} FLOPs: Na about {na:.3g}, best g about {_fmt(g_best, 3)}, "
                 + ("more total parameters help (b < 0): the largest S affordable" if b < 0 else "total parameters do not help (b >= 0): S = 1"))

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(np.exp(pred), d["val_loss"], s=12)
        lo, hi = float(d["val_loss"].min()), float(d["val_loss"].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8), ax.set_xlabel("fitted loss"), ax.set_ylabel("measured loss")
    f.plot = plot
    return f


def all_findings(trials: pd.DataFrame, steps: pd.DataFrame | None = None) -> list[Finding]:
    """Every finding (and the scaling fit) from a trials table and optionally its steps table."""
    df = completed(trials)
    noise = seed_noise(df)
    steps = steps if steps is not None else pd.DataFrame()
    return [
        expert_count(df, noise), best_granularity(df, noise), small_effects(df, noise), dropless(df, noise),
        compute_threshold(df, noise), balancing(df, noise), unipool(df, noise), pathmoe(df, steps, noise),
        routing_probe(df, noise), scaling_fit(df),
    ]

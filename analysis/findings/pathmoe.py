"""Finding 8: routers shared by blocks of layers (PathMoE) beat independent ones with aux loss, and
their paths overlap more and withstand routing perturbation better."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.findings.comparisons import all_but, controlled, last_routing, pair_trials, per_comparison, plain_moe
from analysis.findings.routing_probe import probe_seed_noise
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, fmt, judge, sign_rule, signed_list,
)

# PathMoE's headline: routers shared by B = 4 layers without aux loss vs independent ones with 0.01.
PATHMOE_MAIN_BLOCK, PATHMOE_BASELINE_AUX = 4, 0.01


def _headline_check(moe: pd.DataFrame, noise: float | None) -> Check:
    """Block-shared routers (B > 1) without aux loss vs independent routers (B = 1) with aux
    PATHMOE_BASELINE_AUX, paired by seed; judged at B = PATHMOE_MAIN_BLOCK where tested (else at
    every B > 1): each must win beyond the noise (`sign_rule`)."""
    claim = (f"B = {PATHMOE_MAIN_BLOCK} routers without aux loss beat independent routers with aux "
             f"{PATHMOE_BASELINE_AUX:g}")
    b, aux = moe["router_block_size"].fillna(1), moe["aux_weight"].fillna(0)
    p = pair_trials(moe[(b > 1) & (aux == 0)], moe[(b == 1) & np.isclose(aux, PATHMOE_BASELINE_AUX)],
                    all_but("router_block_size", "aux_weight"))
    t = per_comparison(p, ["scale", "router_block_size"]).sort_values(["scale", "router_block_size"])
    if t.empty:
        return Check(claim, NOT_TESTED, detail=f"no aux-free B > 1 trial pairs with a B = 1 trial at aux "
                                               f"{PATHMOE_BASELINE_AUX:g}")
    main = t[t["router_block_size"] == PATHMOE_MAIN_BLOCK]
    main = main if len(main) else t
    detail = (f"loss(B, no aux) - loss(B = 1, aux {PATHMOE_BASELINE_AUX:g}), paired by seed: "
              + signed_list(t, lambda r: f"{r['scale']} B={r['router_block_size']:g}", "delta"))
    return Check(claim, sign_rule(list(zip(main["delta"], main["seeds"])), noise, -1), float(main["delta"].mean()),
                 detail)


def _by_block(moe: pd.DataFrame) -> pd.DataFrame:
    """Per controlled group over B (same aux weight): mean loss, overlap, entropy and probe by B."""
    rows = []
    for i, g in enumerate(controlled(moe, ["router_block_size"])):
        for b, sub in g.groupby("router_block_size"):
            rows.append({"group": i, "scale": g["scale"].iloc[0], "aux_weight": g["aux_weight"].iloc[0], "B": int(b),
                         "val_loss": float(sub["val_loss"].mean()), "seeds": int(sub["seed"].nunique()),
                         "jaccard": float(sub["jaccard"].mean()), "entropy": float(sub["entropy"].mean()),
                         "probe": float(sub["probe_loss_increase"].mean())})
    return pd.DataFrame(rows)


def _main_vs_independent(table: pd.DataFrame, col: str) -> list[tuple[dict, float]]:
    """Per group with B = 1 and a B > 1: (the row at B = PATHMOE_MAIN_BLOCK, else at the largest B;
    its `col` minus B = 1's), where both are measured."""
    out = []
    for _, g in table.groupby("group"):
        one, rest = g[g["B"] == 1], g[g["B"] > 1]
        if one.empty or rest.empty:
            continue
        main = rest[rest["B"] == (PATHMOE_MAIN_BLOCK if (rest["B"] == PATHMOE_MAIN_BLOCK).any() else rest["B"].max())]
        d = float(main[col].iloc[0] - one[col].iloc[0])
        if not math.isnan(d):
            out.append((main.iloc[0].to_dict(), d))
    return out


def _block_label(r: dict) -> str:
    return f"{r['scale']} aux {r['aux_weight']:g} B={r['B']}:"


def _overlap_check(table: pd.DataFrame) -> Check:
    """At the same aux weight, B = 4 (or the largest B) has higher consecutive-layer overlap and
    lower routing entropy than B = 1 in every group; contradicted: lower overlap in every group.
    Signs only: the routing statistics have no noise estimate."""
    claim = "shared routers raise consecutive-layer overlap and lower routing entropy"
    jac, ent = _main_vs_independent(table, "jaccard"), _main_vs_independent(table, "entropy")
    if not jac:
        return Check(claim, NOT_TESTED, detail="no routing/jaccard in the steps table", required=False)
    up, down = all(d > 0 for _, d in jac), bool(ent) and all(d < 0 for _, d in ent)
    verdict = REPRODUCED if up and down else CONTRADICTED if all(d < 0 for _, d in jac) else INCONCLUSIVE
    # rank correlation, ties averaged; NaN under 3 points or a constant column
    rho = [g[["B", "jaccard"]].corr(method="spearman", min_periods=3).iloc[0, 1] for _, g in table.groupby("group")]
    return Check(claim, verdict, float(np.mean([d for _, d in jac])),
                 "overlap (routing/jaccard, last logged) minus B = 1's: "
                 + ", ".join(f"{_block_label(r)} {d:+.3f}" for r, d in jac)
                 + "; entropy minus B = 1's: " + ", ".join(f"{_block_label(r)} {d:+.3f}" for r, d in ent)
                 + f"; rank corr of overlap with B: {', '.join(fmt(x, 2) for x in rho)}; signs only", required=False)


def _robustness_check(table: pd.DataFrame, noise: float | None) -> Check:
    """At the same aux weight, B = 4 (or the largest B) loses less than B = 1 when one layer
    routes at random (the routing probe), beyond the probe's seed noise (`sign_rule`)."""
    claim = "shared routers are more robust to routing perturbation (routing probe)"
    d = _main_vs_independent(table, "probe")
    if not d:
        return Check(claim, NOT_TESTED, detail="no routing probe on both B = 1 and B > 1", required=False)
    return Check(claim, sign_rule([(x, int(r["seeds"])) for r, x in d], noise, -1), float(np.mean([x for _, x in d])),
                 "probe loss increase minus B = 1's: " + ", ".join(f"{_block_label(r)} {x:+.4f}" for r, x in d)
                 + f"; probe noise (sd) {fmt(noise)}", required=False)


def pathmoe(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """Routers shared by blocks of B layers. Verdict: PathMoE's headline (`_headline_check`).
    Supporting, by B at a fixed aux weight: overlap up and entropy down (the steps table's last
    logged routing/jaccard and routing/entropy), and a smaller routing-probe loss increase."""
    moe = plain_moe(df).merge(last_routing(steps, ["jaccard", "entropy"]), on="trial_id", how="left")
    moe = moe.assign(**{c: np.nan for c in ("jaccard", "entropy") if c not in moe})
    table = _by_block(moe)
    f = Finding("pathmoe", "8. Routers shared across layers (PathMoE)",
                f"Routers shared over blocks of B = {PATHMOE_MAIN_BLOCK} layers, without aux loss, beat independent "
                f"routers with aux {PATHMOE_BASELINE_AUX:g}; paths overlap more and withstand routing perturbation "
                "better.", INCONCLUSIVE, "no sweep varies the router block size", table, noise)
    if table.empty:
        return f
    f.checks = [_headline_check(moe, noise), _overlap_check(table), _robustness_check(table, probe_seed_noise(moe))]
    f.table = table.drop(columns="group")

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for (scale, aux), g in table.groupby(["scale", "aux_weight"]):
            g = g.sort_values("B")
            ax1.plot(g["B"], g["val_loss"], marker="o", label=f"{scale} aux={aux:g}")
            ax2.plot(g["B"], g["jaccard"], marker="o", label=f"{scale} aux={aux:g}")
        ax1.set_xlabel("router block size B"), ax1.set_ylabel("validation loss"), ax1.legend(fontsize=7)
        ax2.set_xlabel("router block size B"), ax2.set_ylabel("consecutive-layer overlap (Jaccard)")
    f.plot = plot
    return judge(f)


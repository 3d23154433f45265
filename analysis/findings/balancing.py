"""Finding 6: load balancing fails at low aux weight without bias and at very high bias rates, and
is robust to the settings between."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.comparisons import controlled, last_routing, vanilla_moe
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge, sign_rule, signed_list,
    spread_beyond_noise,
)
from analysis.stats import beyond_noise, mean_by

# Balancing (design study): the settings it calls reasonable, between its two failure modes. Aux
# weights around the usual 0.01 (Switch, OLMoE) and loss-free bias rates up to 10x DeepSeek-V3's
# 0.001; below (aux < 1e-3 with no bias) imbalance grows, above (bias rate > 1e-2) quality drops.
AUX_REASONABLE = (1e-3, 1e-1)
BIAS_MODERATE_MAX = 1e-2


def balancing_class(aux: float, bias: float) -> str:
    """Where a setting sits in the study's reading: one of the two failure modes, the reasonable
    region between them, or "other" (aux above the range without bias: no claim is made)."""
    aux, bias = (0.0 if pd.isna(aux) else float(aux)), (0.0 if pd.isna(bias) else float(bias))
    if bias > BIAS_MODERATE_MAX:
        return "very high bias rate"
    if bias == 0 and aux < AUX_REASONABLE[0]:
        return "low aux, no bias"
    if AUX_REASONABLE[0] <= aux <= AUX_REASONABLE[1] or bias > 0:
        return "reasonable"
    return "other"


def _balancing_row(g: pd.DataFrame) -> dict | None:
    """One controlled group over aux weight x bias rate: the spread over reasonable settings and
    each failure mode's mean loss (and routing max load) minus the reasonable settings' mean."""
    cls = pd.Series([balancing_class(a, b) for a, b in zip(g["aux_weight"], g["bias_rate"])], index=g.index)
    reasonable = g[cls == "reasonable"]
    if reasonable.empty:
        return None
    means = mean_by(reasonable, ["aux_weight", "bias_rate"])
    row = {"scale": g["scale"].iloc[0], "num_experts": int(g["num_experts"].iloc[0]),
           "reasonable_settings": len(means), "reasonable_range": float(means.max() - means.min()),
           "mean_loss": float(means.mean()),
           "seeds": int(g.groupby(["aux_weight", "bias_rate"])["seed"].nunique().min())}
    for mode, name in [("low aux, no bias", "low_aux"), ("very high bias rate", "high_bias")]:
        sub = g[cls == mode]
        row[f"{name}_minus_reasonable"] = float(sub["val_loss"].mean() - means.mean()) if len(sub) else np.nan
        load = float(sub["max_load"].mean() - reasonable["max_load"].mean()) if len(sub) else np.nan
        row[f"{name}_max_load_minus_reasonable"] = load
    return row


def _robust_check(table: pd.DataFrame, noise: float | None) -> Check:
    """Every group's loss range over its (>= 2) reasonable settings is within the noise
    (SPREAD_SE; without seeds: within 1% of the mean loss)."""
    claim = "robust to the settings between the failure modes"
    table = table[table["reasonable_settings"] >= 2]
    if table.empty:
        return Check(claim, NOT_TESTED, detail="no group has two reasonable settings")
    ok = [(spread_beyond_noise(r["reasonable_range"], noise, r["seeds"]) is False) if noise is not None
          else r["reasonable_range"] <= 0.01 * r["mean_loss"] for r in table.to_dict("records")]
    return Check(claim, REPRODUCED if all(ok) else CONTRADICTED, float(table["reasonable_range"].max()),
                 f"loss range over reasonable settings (aux in [{AUX_REASONABLE[0]:g}, {AUX_REASONABLE[1]:g}] or bias "
                 f"rate in (0, {BIAS_MODERATE_MAX:g}]), by expert count: "
                 + ", ".join(f"{r['scale']} n={r['num_experts']}: {r['reasonable_range']:.4f}"
                             for r in table.to_dict("records")))


def _group_label(r: dict) -> str:
    return f"{r['scale']} n={r['num_experts']}:"


def _low_aux_check(table: pd.DataFrame, noise: float | None, has_load: bool) -> Check:
    """Low aux weight without bias is worse than the reasonable settings in every group (`sign_rule`),
    and, where the steps table logs routing/max_load, more imbalanced too."""
    claim = f"low aux weight (< {AUX_REASONABLE[0]:g}) without bias: worse loss and higher imbalance"
    t = table.dropna(subset=["low_aux_minus_reasonable"])
    if t.empty:
        return Check(claim, NOT_TESTED, detail="no low aux weight without bias shares a group with reasonable settings")
    verdict = sign_rule(list(zip(t["low_aux_minus_reasonable"], t["seeds"])), noise, +1)
    detail = "loss minus reasonable: " + signed_list(t, _group_label, "low_aux_minus_reasonable")
    load = t.dropna(subset=["low_aux_max_load_minus_reasonable"])
    if has_load and len(load):
        detail += ("; imbalance (last logged routing/max_load) minus reasonable: "
                   + signed_list(load, _group_label, "low_aux_max_load_minus_reasonable", 3))
        if verdict == REPRODUCED and not (load["low_aux_max_load_minus_reasonable"] > 0).all():
            verdict = INCONCLUSIVE
    else:
        detail += "; imbalance not measured (no routing/max_load in the steps table): loss only"
    return Check(claim, verdict, float(t["low_aux_minus_reasonable"].mean()), detail)


def _high_bias_check(table: pd.DataFrame, noise: float | None) -> Check:
    """A very high bias rate (> BIAS_MODERATE_MAX) is worse than the reasonable settings at the
    largest expert count (beyond the noise), and hurts no less there than at the smallest.
    Contradicted: it helps at the most experts, or hurts more with fewer experts, beyond the noise."""
    claim = f"very high bias rate (> {BIAS_MODERATE_MAX:g}) hurts, most with many experts"
    t = table.dropna(subset=["high_bias_minus_reasonable"])
    if t.empty:
        return Check(claim, NOT_TESTED, detail=f"no bias rate above {BIAS_MODERATE_MAX:g} in the tables")
    by_n = t.groupby("num_experts").agg(harm=("high_bias_minus_reasonable", "mean"), seeds=("seeds", "min"))
    top, bottom = by_n.iloc[-1], by_n.iloc[0]
    hurts = sign_rule([(float(top["harm"]), int(top["seeds"]))], noise, +1)
    gap = float(bottom["harm"] - top["harm"])
    shrinks = len(by_n) > 1 and gap > 0 and beyond_noise(gap, noise, int(by_n["seeds"].min())) is not False
    verdict = CONTRADICTED if hurts == CONTRADICTED or shrinks else hurts if hurts == REPRODUCED else INCONCLUSIVE
    detail = "loss minus reasonable, by expert count: " + ", ".join(f"n={n}: {v:+.4f}" for n, v in by_n["harm"].items())
    return Check(claim, verdict, float(top["harm"]),
                 detail + ("" if len(by_n) > 1 else "; one expert count: growth with n not tested"))


def balancing(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """Balancing fails in two ways and is robust between them. Per controlled group over aux
    weight x bias rate: low aux without bias is worse (and, if logged, more imbalanced) than the
    reasonable settings; a very high bias rate is worse, most with many experts; the reasonable
    settings differ within the noise. All three are sub-claims."""
    # The claim is about independent routers; PathMoE's shared ones are meant to go without aux loss.
    moe = vanilla_moe(df).merge(last_routing(steps, ["max_load"]), on="trial_id", how="left")
    has_load = "max_load" in moe
    moe = moe if has_load else moe.assign(max_load=np.nan)
    rows = [r for g in controlled(moe, ["aux_weight", "bias_rate"]) if (r := _balancing_row(g)) is not None]
    table = pd.DataFrame(rows)
    f = Finding("balancing", "6. Balancing is robust between two failure modes",
                "Low aux weights without loss-free bias give higher imbalance and worse loss; very high bias rates "
                "hurt, most with many experts; between those, quality is robust to the settings.",
                INCONCLUSIVE, "no sweep varies aux weight or bias rate", table, noise)
    if table.empty:
        return f
    f.checks = [_robust_check(table, noise), _low_aux_check(table, noise, has_load), _high_bias_check(table, noise)]
    grids = [(g["scale"].iloc[0], int(g["num_experts"].iloc[0]),
              g.pivot_table(index="aux_weight", columns="bias_rate", values="val_loss"))
             for g in controlled(moe, ["aux_weight", "bias_rate"], min_levels=4)
             if g["aux_weight"].nunique() > 1 and g["bias_rate"].nunique() > 1]

    def plot(fig):
        for i, (scale, n, grid) in enumerate(grids):
            ax = fig.add_subplot(1, len(grids), i + 1)
            im = ax.imshow(grid.values, cmap="viridis_r", aspect="auto")
            ax.set_xticks(range(grid.shape[1]), [f"{c:g}" for c in grid.columns], fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [f"{c:g}" for c in grid.index], fontsize=7)
            ax.set_xlabel("bias rate"), ax.set_ylabel("aux weight"), ax.set_title(f"{scale} n={n}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.05)
    f.plot = plot
    return judge(f)


"""Finding 6: load balancing fails at low aux weight without bias and at very high bias rates, and
is robust to the settings between."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.comparisons import controlled, last_routing, vanilla_moe
from analysis.findings.relative import (
    Spread, combine, group_intervals, group_range, interval_text, noise_dof, pick_reference, reference_spreads,
    reference_text, small_verdict,
)
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge, sign_rule, signed_list,
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
    spread, settings, seeds = group_range(reasonable, ["aux_weight", "bias_rate"])
    row = {"scale": g["scale"].iloc[0], "num_experts": int(g["num_experts"].iloc[0]),
           "reasonable_settings": settings, "reasonable_range": spread, "reasonable_seeds": seeds,
           "mean_loss": float(means.mean()),
           "seeds": int(g.groupby(["aux_weight", "bias_rate"])["seed"].nunique().min())}
    for mode, name in [("low aux, no bias", "low_aux"), ("very high bias rate", "high_bias")]:
        sub = g[cls == mode]
        row[f"{name}_minus_reasonable"] = float(sub["val_loss"].mean() - means.mean()) if len(sub) else np.nan
        load = float(sub["max_load"].mean() - reasonable["max_load"].mean()) if len(sub) else np.nan
        row[f"{name}_max_load_minus_reasonable"] = load
    return row


def _with_intervals(table: pd.DataFrame, noise: float | None, dof: float) -> pd.DataFrame:
    """The reasonable settings' loss range per group with its interval (simultaneous over the groups
    of >= 2 reasonable settings, `relative.group_intervals`) and the studentized range's p-value."""
    judged = table["reasonable_settings"] >= 2
    ranges = [(r["reasonable_range"], r["reasonable_settings"], r["reasonable_seeds"])
              for r in table[judged].to_dict("records")]
    bounds = group_intervals(ranges, noise, dof)
    table = table.assign(reasonable_low=np.nan, reasonable_high=np.nan, reasonable_p=np.nan)
    table.loc[judged, "reasonable_low"] = [b[0] for b in bounds]
    table.loc[judged, "reasonable_high"] = [b[1] for b in bounds]
    table.loc[judged, "reasonable_p"] = [np.nan if b[2] is None else b[2] for b in bounds]
    return table


def _robust_check(table: pd.DataFrame, refs: dict[str, Spread | None], noise: float | None) -> Check:
    """Robust means small relative to expert count and granularity, as finding 3 says of balancing:
    every group's loss range over its (>= 2) reasonable settings, with its interval, is small
    against the smaller reference (`relative.small_verdict`); contradicted when one group's is
    shown not small. Not tested where the tables do not measure both references."""
    claim = "robust to the settings between the failure modes"
    table = table[table["reasonable_settings"] >= 2]
    if table.empty:
        return Check(claim, NOT_TESTED, detail="no group has two reasonable settings")
    ref = pick_reference(refs)
    rows = table.to_dict("records")
    verdict = combine([small_verdict((r["reasonable_low"], r["reasonable_high"]), ref) for r in rows])
    return Check(claim, NOT_TESTED if ref is None else verdict, float(table["reasonable_range"].max()),
                 f"loss range over reasonable settings (aux in [{AUX_REASONABLE[0]:g}, {AUX_REASONABLE[1]:g}] or bias "
                 f"rate in (0, {BIAS_MODERATE_MAX:g}]), by expert count: "
                 + ", ".join(f"{_group_label(r)} " + interval_text(r["reasonable_range"], r["reasonable_low"],
                                                                    r["reasonable_high"], r["reasonable_p"])
                             + f" over {r['reasonable_settings']} settings" for r in rows)
                 + "; " + reference_text(refs, noise))


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
    settings move loss little relative to expert count and granularity (`relative`). All three are
    sub-claims."""
    # The claim is about independent routers; PathMoE's shared ones are meant to go without aux loss.
    moe = vanilla_moe(df).merge(last_routing(steps, ["max_load"]), on="trial_id", how="left")
    has_load = "max_load" in moe
    moe = moe if has_load else moe.assign(max_load=np.nan)
    rows = [r for g in controlled(moe, ["aux_weight", "bias_rate"]) if (r := _balancing_row(g)) is not None]
    table = pd.DataFrame(rows)
    dof = noise_dof(df)
    f = Finding("balancing", "6. Balancing is robust between two failure modes",
                "Low aux weights without loss-free bias give higher imbalance and worse loss; very high bias rates "
                "hurt, most with many experts; between those, quality is robust to the settings.",
                INCONCLUSIVE, "no sweep varies aux weight or bias rate", table, noise)
    if table.empty:
        return f
    f.table = table = _with_intervals(table, noise, dof)
    robust = _robust_check(table, reference_spreads(df, noise, dof), noise)
    f.checks = [robust, _low_aux_check(table, noise, has_load), _high_bias_check(table, noise)]
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


"""Finding 3: shared experts, heterogeneous expert sets and balancing move loss less than expert
count and granularity, and generalist shared experts hurt."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.balancing import balancing_class
from analysis.findings.comparisons import all_but, controlled, pair_trials, per_comparison, plain_moe, vanilla_moe
from analysis.findings.granularity import GRANULARITY_MOVES
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, fmt, judge, sign_rule, signed_list,
)
from analysis.stats import beyond_noise, mean_by

# A shared expert at least half the dense FFN wide is the study's "generalist".
GENERALIST_MIN_GRANULARITY = 0.5
# Shared-expert variants are compared with the plain MoE of the same total parameters (the sweeps
# raise the routed expert count to keep it); a trial whose total fell further is not comparable.
MATCHED_TOTAL_TOLERANCE = 0.02


def _shared_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Shared-expert trials against the plain MoE (no shared expert, one set) of the same seed and
    settings apart from the routed experts, at total parameters within MATCHED_TOTAL_TOLERANCE:
    one row per (shared variant, plain setting). Also how many shared trials had no such partner."""
    shared = df[(df["layout"] == "layerwise") & (df["shared_experts"].fillna(0) > 0)]
    p = pair_trials(shared, plain_moe(df),
                    all_but("sparsity", "num_experts", "top_k", "shared_experts", "shared_granularity"))
    p = p[(p["total_params"] / p["total_params_ref"] - 1).abs() <= MATCHED_TOTAL_TOLERANCE]
    table = per_comparison(p, ["scale", "shared_experts", "shared_granularity", "sparsity", "total_params",
                               "total_params_ref"])
    unmatched = int((~shared["trial_id"].isin(p["trial_id"])).sum())
    return table.rename(columns={"delta": "loss_minus_plain"}), unmatched


def _effect(df: pd.DataFrame, factors: list[str], primary: str | None, same_sweep: bool) -> tuple[float, int]:
    """Mean over controlled groups of the range of mean loss across the factors' levels."""
    means = [mean_by(g, factors) for g in controlled(df, factors, primary=primary, same_sweep=same_sweep)]
    ranges = [float(m.max() - m.min()) for m in means]
    return (float(np.mean(ranges)) if ranges else float("nan")), len(ranges)


def _factor_effects(df: pd.DataFrame, shared: pd.DataFrame) -> pd.DataFrame:
    """Effect size per factor: the mean range of loss across its levels in controlled groups. Shared
    experts: across the plain MoE and its matched-total non-generalist shared variants. Balancing:
    over the reasonable settings only (its failure modes are finding 6)."""
    rows = []
    for name, cols, primary in [("expert count (S)", ["sparsity", "num_experts", "expert_width"], "sparsity"),
                                ("granularity", GRANULARITY_MOVES, "granularity")]:
        effect, n = _effect(df, cols, primary, same_sweep=False)
        rows.append({"factor": name, "kind": "major", "effect": effect, "groups": n})
    minor = shared[shared["shared_granularity"] < GENERALIST_MIN_GRANULARITY]
    ranges = minor.groupby("setting_ref")["loss_minus_plain"].agg(lambda d: max(d.max(), 0.0) - min(d.min(), 0.0))
    rows.append({"factor": "shared experts (matched total)", "kind": "minor",
                 "effect": float(ranges.mean()) if len(ranges) else float("nan"), "groups": len(ranges)})
    # Heterogeneous sets and balancing move several settings at once: compare within one sweep.
    effect, n = _effect(df, ["expert_sets", "granularity", "num_experts", "top_k", "expert_width"], "expert_sets",
                        same_sweep=True)
    rows.append({"factor": "heterogeneous sets", "kind": "minor", "effect": effect, "groups": n})
    vanilla = vanilla_moe(df)
    reasonable = [balancing_class(a, b) == "reasonable" for a, b in zip(vanilla["aux_weight"], vanilla["bias_rate"])]
    effect, n = _effect(vanilla[reasonable], ["aux_weight", "bias_rate"], None, same_sweep=True)
    rows.append({"factor": "balancing (reasonable aux x bias)", "kind": "minor", "effect": effect, "groups": n})
    return pd.DataFrame(rows)


def _minor_check(table: pd.DataFrame, noise: float | None) -> Check:
    """Reproduced: the largest minor effect is below the smallest major one; contradicted: the
    smallest minor effect is above the largest major one."""
    claim = "shared experts, heterogeneous sets and balancing move loss less than expert count and granularity"
    major = table[(table["kind"] == "major") & (table["groups"] > 0)]["effect"]
    minor = table[(table["kind"] == "minor") & (table["groups"] > 0)]["effect"]
    detail = "mean loss range per factor: " + ", ".join(
        f"{r['factor']} {fmt(r['effect'])} ({r['groups']} groups)" for r in table.to_dict("records") if r["groups"])
    if not len(major) or not len(minor):
        return Check(claim, NOT_TESTED, detail=detail + "; needs both a major and a minor factor swept")
    if noise is not None and not beyond_noise(major.min(), noise):
        return Check(claim, INCONCLUSIVE, float(minor.max()),
                     detail + "; expert count and granularity themselves move loss within the noise")
    verdict = REPRODUCED if minor.max() < major.min() else CONTRADICTED if minor.min() > major.max() else INCONCLUSIVE
    return Check(claim, verdict, float(minor.max()), detail)


def _generalist_check(shared: pd.DataFrame, unmatched: int, noise: float | None) -> Check:
    """Generalists (g_s >= 1/2) hurt consistently: worse than the plain MoE at matched total
    parameters in every comparison, beyond the noise (`sign_rule`)."""
    claim = "generalist experts hurt in every comparison"
    gen = shared[shared["shared_granularity"] >= GENERALIST_MIN_GRANULARITY]
    left_out = (f"; {unmatched} shared trials left out (total parameters not within {MATCHED_TOTAL_TOLERANCE:.0%} "
                "of a plain MoE)")
    if gen.empty:
        return Check(claim, NOT_TESTED, detail="no generalist has a plain MoE of matched total parameters" + left_out)
    d = gen["loss_minus_plain"]
    pairs = signed_list(gen, lambda r: f"{r['scale']} S={r['sparsity']:g}", "loss_minus_plain")
    detail = (f"generalist minus plain MoE at matched total parameters (within {MATCHED_TOTAL_TOLERANCE:.0%}), paired "
              f"by seed: {pairs}; mean {d.mean():+.4f} over {len(d)} comparisons" + left_out)
    return Check(claim, sign_rule(list(zip(d, gen["seeds"])), noise, +1), float(d.mean()), detail)


def small_effects(df: pd.DataFrame, noise: float | None) -> Finding:
    """Shared experts, heterogeneous sets and balancing move loss less than expert count and
    granularity (effect = mean range of loss across a factor's levels), and generalist experts
    hurt. Shared-expert variants are compared with the plain MoE at matched total parameters."""
    shared, unmatched = _shared_pairs(df)
    table = _factor_effects(df, shared)
    f = Finding("small_effects", "3. Shared experts, heterogeneous sets and balancing matter little",
                "Shared-expert size, heterogeneous experts and balancing settings have small effects; generalist "
                "experts consistently hurt (at matched total parameters).", INCONCLUSIVE, "", table, noise)
    f.checks = [_minor_check(table, noise), _generalist_check(shared, unmatched, noise)]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        t = table[table["groups"] > 0]
        ax.barh(t["factor"], t["effect"], color=["tab:blue" if k == "major" else "tab:gray" for k in t["kind"]])
        ax.set_xlabel("mean range of validation loss across the factor's levels")
    f.plot = plot
    return judge(f)


"""Finding 3: shared experts, heterogeneous expert sets and balancing move loss less than expert
count and granularity, and generalist shared experts hurt."""

from __future__ import annotations

import math

import pandas as pd

from analysis.findings.balancing import balancing_class
from analysis.findings.comparisons import all_but, pair_trials, per_comparison, plain_moe, vanilla_moe
from analysis.findings.relative import (
    LEVEL, SMALL_RATIO, Spread, combine, factor_spread, interval_text, noise_dof, pick_reference, ratio_interval,
    reference_spreads, reference_text, small_verdict, spread_of,
)
from analysis.findings.verdicts import INCONCLUSIVE, NOT_TESTED, Check, Finding, fmt, judge, sign_rule, signed_list

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


def _minor_spreads(df: pd.DataFrame, shared: pd.DataFrame, noise: float | None, dof: float) -> dict[str, Spread | None]:
    """The spread of each minor factor (None where it is not swept). Shared experts: across the
    plain MoE and its matched-total non-generalist shared variants (paired by seed, so the range
    of their mean losses). Balancing: over the reasonable settings only (its failure modes are
    finding 6). Heterogeneous sets and balancing move several settings at once: within one sweep."""
    minor = shared[shared["shared_granularity"] < GENERALIST_MIN_GRANULARITY]
    ranges = [(max(g["loss_minus_plain"].max(), 0.0) - min(g["loss_minus_plain"].min(), 0.0), len(g) + 1,
               int(g["seeds"].min())) for _, g in minor.groupby("setting_ref")]
    vanilla = vanilla_moe(df)
    reasonable = [balancing_class(a, b) == "reasonable" for a, b in zip(vanilla["aux_weight"], vanilla["bias_rate"])]
    return {
        "shared experts (matched total)": spread_of(ranges, noise, dof),
        "heterogeneous sets": factor_spread(df, ["expert_sets", "granularity", "num_experts", "top_k", "expert_width"],
                                            "expert_sets", noise, dof, same_sweep=True),
        "balancing (reasonable aux x bias)": factor_spread(vanilla[reasonable], ["aux_weight", "bias_rate"], None,
                                                           noise, dof, same_sweep=True),
    }


def _factor_table(refs: dict[str, Spread | None], minors: dict[str, Spread | None]) -> pd.DataFrame:
    """One row per factor: its spread with the interval, the noise test's p, and for the minor ones
    the spread as a multiple of the reference (with its interval) and its own verdict."""
    ref = pick_reference(refs)
    rows = []
    for kind, spreads in (("major", refs), ("minor", minors)):
        for name, sp in spreads.items():
            row = {"factor": name, "kind": kind, "effect": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                   "groups": 0, "settings": 0, "seeds": 0, "p_noise": math.nan, "ratio_low": math.nan,
                   "ratio": math.nan, "ratio_high": math.nan, "verdict": NOT_TESTED if kind == "minor" else ""}
            if sp is not None:
                row.update(effect=sp.effect, ci_low=sp.low, ci_high=sp.high, groups=sp.groups, settings=sp.settings,
                           seeds=sp.seeds, p_noise=math.nan if sp.p is None else sp.p)
            if sp is not None and kind == "minor":
                low, high = ratio_interval(sp.low, sp.high, ref)
                ratio = sp.effect / ref[1].effect if ref and ref[1].effect > 0 else math.nan
                row.update(ratio_low=low, ratio=ratio, ratio_high=high, verdict=small_verdict(sp, ref))
            rows.append(row)
    return pd.DataFrame(rows)


def _minor_check(table: pd.DataFrame, refs: dict[str, Spread | None], noise: float | None) -> Check:
    """Each swept minor factor's spread is small against the smaller of the expert-count and
    granularity spreads (`relative.small_verdict`); contradicted when one is shown not small. Not
    tested without a minor factor swept or without both references measured."""
    claim = "shared experts, heterogeneous sets and balancing move loss less than expert count and granularity"
    minor = table[(table["kind"] == "minor") & (table["groups"] > 0)]
    listing = "; ".join(f"{r['factor']} {interval_text(r['effect'], r['ci_low'], r['ci_high'], r['p_noise'])} "
                        f"over {r['groups']} groups of up to {r['settings']} settings"
                        + (f", {fmt(r['ratio'], 2)}x [{fmt(r['ratio_low'], 2)}, {fmt(r['ratio_high'], 2)}] of the "
                           f"reference: {r['verdict']}" if not math.isnan(r["ratio"]) else "")
                        for r in minor.to_dict("records"))
    detail = reference_text(refs, noise) + (f"; {listing}" if listing else "")
    if minor.empty:
        return Check(claim, NOT_TESTED, detail=detail + "; no minor factor is swept")
    verdict = NOT_TESTED if pick_reference(refs) is None else combine(list(minor["verdict"]))
    return Check(claim, verdict, float(minor["effect"].max()), detail)


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
    """Shared experts, heterogeneous sets and balancing have small effects relative to expert count
    and granularity (`relative`: each factor's largest range of loss over its levels, with an
    interval, against SMALL_RATIO of the smaller reference), and generalist experts hurt.
    Shared-expert variants are compared with the plain MoE at matched total parameters."""
    shared, unmatched = _shared_pairs(df)
    dof = noise_dof(df)
    refs = reference_spreads(df, noise, dof)
    table = _factor_table(refs, _minor_spreads(df, shared, noise, dof))
    f = Finding("small_effects", "3. Shared experts, heterogeneous sets and balancing matter little",
                "Shared-expert size, heterogeneous experts and balancing settings have small effects; generalist "
                "experts consistently hurt (at matched total parameters).", INCONCLUSIVE, "", table, noise)
    f.checks = [_minor_check(table, refs, noise), _generalist_check(shared, unmatched, noise)]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        t = table[table["groups"] > 0]
        err = [t["effect"] - t["ci_low"], t["ci_high"] - t["effect"]]
        ax.barh(t["factor"], t["effect"], xerr=err, capsize=3,
                color=["tab:blue" if k == "major" else "tab:gray" for k in t["kind"]])
        ref = pick_reference(refs)
        if ref is not None and ref[1].low > 0:
            ax.axvline(SMALL_RATIO * ref[1].low, color="tab:red", ls="--", lw=1, label=f"{SMALL_RATIO:g} x reference")
            ax.legend(fontsize=7)
        ax.set_xlabel(f"largest range of validation loss across the factor's levels ({LEVEL:.0%} interval)")
    f.plot = plot
    return judge(f)


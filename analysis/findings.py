"""The study's findings, each computed from the result tables with its evidence and a verdict.

Every finding compares only trials that differ in the factor it is about (`stats.controlled_groups`,
or trials paired by seed and every other setting), judges effects against the seed noise where
the sweeps repeat seeds, and says `inconclusive` when the tables do not hold the comparison or the
effect is within the noise. A finding is the conjunction of its sub-claims (`Check`), each with its
own verdict and number, following the conditions in methods.md section 5. Without repeated seeds
the sign of an effect decides. Rules are stated in each function's docstring; thresholds are
deliberately simple so a reader can check them by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from analysis.stats import SETTINGS, beyond_noise, completed, controlled_groups, mean_by, seed_noise, spearman

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
NOT_TESTED = "not tested"  # a sub-claim the tables hold no comparison for (never a finding's verdict)

# Balancing (design study): the settings it calls reasonable, between its two failure modes. Aux
# weights around the usual 0.01 (Switch, OLMoE) and loss-free bias rates up to 10x DeepSeek-V3's
# 0.001; below (aux < 1e-3 with no bias) imbalance grows, above (bias rate > 1e-2) quality drops.
AUX_REASONABLE = (1e-3, 1e-1)
BIAS_MODERATE_MAX = 1e-2
# The spread of k seed-averaged losses grows with k under pure noise; 4 standard errors of a
# difference keeps a grid of ~16 settings from looking sensitive by chance (P < 1%).
SPREAD_SE = 4.0
# A shared expert at least half the dense FFN wide is the study's "generalist".
GENERALIST_MIN_GRANULARITY = 0.5
# Shared-expert variants are compared with the plain MoE of the same total parameters (the sweeps
# raise the routed expert count to keep it); a trial whose total fell further is not comparable.
MATCHED_TOTAL_TOLERANCE = 0.02
# UniPool: pools of 41.6% to 66.7% of the vanilla expert budget are reported to match vanilla.
UNIPOOL_REDUCED_RANGE = (5 / 12, 2 / 3)
# UniPool's recipe moves these together (pool, NormRouter, pool loss instead of per-layer aux).
UNIPOOL_RECIPE = ["layout", "sparsity", "num_experts", "pool_group_size", "router_scoring", "aux_weight", "pool_weight"]
# PathMoE's headline: routers shared by B = 4 layers without aux loss vs independent ones with 0.01.
PATHMOE_MAIN_BLOCK, PATHMOE_BASELINE_AUX = 4, 0.01
OVERFLOW_OPTIONS = {"drop": "dropping overflow tokens", "default_expert": "routing overflow to a default expert"}


@dataclass
class Check:
    """One sub-claim of a finding, with its own verdict and the number behind it."""
    claim: str
    verdict: str
    effect: float | None = None  # the measured effect the verdict rests on (a loss difference unless said)
    detail: str = ""
    required: bool = True  # False: supporting evidence, judged only where the tables hold it


@dataclass
class Finding:
    key: str
    title: str
    claim: str
    verdict: str
    summary: str  # the numbers behind the verdict: each sub-claim's verdict and evidence
    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    noise: float | None = None
    plot: Callable | None = None  # plot(fig) draws the figure
    checks: list[Check] = field(default_factory=list)  # the sub-claims the verdict is made of


def _judge(f: Finding) -> Finding:
    """Verdict and summary from the sub-claims. A required one contradicted contradicts the finding;
    all required ones reproduced, and every supporting one the tables hold too, reproduce it;
    anything else (no data, within the noise, evidence both ways) is inconclusive."""
    required = [c.verdict for c in f.checks if c.required]
    supporting = [c.verdict for c in f.checks if not c.required and c.verdict != NOT_TESTED]
    if CONTRADICTED in required:
        f.verdict = CONTRADICTED
    elif required and all(v == REPRODUCED for v in required + supporting):
        f.verdict = REPRODUCED
    else:
        f.verdict = INCONCLUSIVE
    f.summary = "; ".join(f"{c.claim}: {c.verdict}" + (f" ({c.detail})" if c.detail else "") for c in f.checks)
    f.summary += f"; {_noise_text(f.noise)}"
    return f


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _noise_text(noise: float | None) -> str:
    return f"seed noise (sd) {noise:.4f}" if noise is not None else "no repeated seeds: noise unknown"


def _listing(rows: pd.DataFrame, label: Callable[[dict], str], col: str, digits: int = 4) -> str:
    """Each row's label and signed `col` value, comma-separated."""
    return ", ".join(f"{label(r)} {r[col]:+.{digits}f}" for r in rows.to_dict("records"))


def _tol(noise: float | None, n: int) -> float:
    """The largest difference of two n-seed means still within the noise (0 when it is unknown)."""
    return 2 * noise * math.sqrt(2 / max(n, 1)) if noise is not None else 0.0


def _spread_beyond(spread: float, noise: float | None, n: int) -> bool | None:
    """Is the range of several n-seed means more than noise explains (SPREAD_SE)? None if unknown."""
    return None if noise is None else bool(spread > SPREAD_SE * noise * math.sqrt(2 / max(n, 1)))


def _rule(effects: list[tuple[float, int]], noise: float | None, sign: int) -> str:
    """Claim: every effect (value, seeds) has `sign`. Reproduced when each does beyond the noise;
    contradicted when one has the other sign beyond it; not tested without effects."""
    if not effects:
        return NOT_TESTED
    if all(sign * e > 0 and beyond_noise(e, noise, n) is not False for e, n in effects):
        return REPRODUCED
    if any(sign * e < 0 and beyond_noise(e, noise, n) is not False for e, n in effects):
        return CONTRADICTED
    return INCONCLUSIVE


def prepare(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials with the columns the findings read. `overflow` (capacity trials: "drop" or
    "default_expert", missing means "drop"; dropless: null) joins the setting key, so trials that
    differ only in it are not taken for seed repeats."""
    df = completed(trials)
    for col in SETTINGS + ["seed", "sweep", "trial_id", "val_loss", "total_params", "active_params", "train_flops",
                           "probe_loss_increase", "overflow"]:
        if col not in df:
            df[col] = np.nan
    df["overflow"] = df["overflow"].astype(object).fillna("drop").where(df["capacity_factor"].notna(), None)
    df["setting"] = df["setting"] + "|overflow=" + df["overflow"].fillna("none").astype(str)
    return df


def _controlled(df: pd.DataFrame, factors: list[str], min_levels: int = 2, primary: str | None = None,
                same_sweep: bool = False) -> list[pd.DataFrame]:
    """`controlled_groups`, also split by the overflow option (a setting stats.SETTINGS predates)."""
    out = []
    for group in controlled_groups(df, factors, min_levels, primary, same_sweep):
        for _, sub in group.groupby("overflow", dropna=False):
            if len(sub[[primary] if primary else factors].astype(str).drop_duplicates()) >= min_levels:
                out.append(sub)
    return out


def _scalar(v: object) -> object:
    """A setting value as a key part: nulls alike, numbers as float (1 == 1.0)."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return float(v) if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def _key(df: pd.DataFrame, cols: list[str]) -> pd.Series:
    """One string per row naming its values of `cols`."""
    rows = df[cols].itertuples(index=False, name=None)
    return pd.Series([json.dumps([_scalar(v) for v in row]) for row in rows], index=df.index, dtype=object)


def _pairs(a: pd.DataFrame, b: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each row of `a` with each row of `b` equal in every column of `keys` (b's columns get `_ref`),
    and `delta` = a's val_loss - b's."""
    p = a.assign(_k=_key(a, keys)).merge(b.assign(_k=_key(b, keys)), on="_k", suffixes=("", "_ref"))
    return p.assign(delta=p["val_loss"] - p["val_loss_ref"])


def _but(*cols: str) -> list[str]:
    """Pairing keys: the seed and every setting except `cols`."""
    return [c for c in SETTINGS if c not in cols] + ["seed"]


def _per_comparison(p: pd.DataFrame, cols: list[str], values: tuple[str, ...] = ("delta",)) -> pd.DataFrame:
    """One row per compared pair of settings (`setting`, `setting_ref`): `cols` (of the first
    trial), the mean of `values` over its seed pairs, and `seeds` (how many)."""
    if p.empty:
        return pd.DataFrame(columns=["setting", "setting_ref"] + cols + list(values) + ["seeds"])
    g = p.groupby(["setting", "setting_ref"], sort=False)
    out = g[cols].first()
    for v in values:
        out[v] = g[v].mean()
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def _last_routing(steps: pd.DataFrame, stats: list[str]) -> pd.DataFrame:
    """Per trial, the last logged value of each `routing/<stat>` the steps table has (as <stat>)."""
    cols = [f"routing/{s}" for s in stats if f"routing/{s}" in steps]
    if steps.empty or not cols:
        return pd.DataFrame(columns=["trial_id"])
    # A column that is null in every row of a per-trial file is stored as text: read it as numbers.
    numeric = steps[["trial_id", "step"]].assign(**{c: pd.to_numeric(steps[c], errors="coerce") for c in cols})
    last = numeric.sort_values("step").groupby("trial_id")[cols].last()  # last non-null: the last logging step
    return last.rename(columns=lambda c: c.split("/", 1)[1]).reset_index()


def _moe(df: pd.DataFrame) -> pd.DataFrame:
    """Plain layer-wise MoEs: one expert set, no shared experts."""
    plain = (df["expert_sets"].fillna(1) <= 1) & (df["shared_experts"].fillna(0) == 0)
    return df[(df["layout"] == "layerwise") & plain]


def _vanilla(df: pd.DataFrame) -> pd.DataFrame:
    """Plain layer-wise MoEs with independent routers (the baseline of balancing, UniPool, PathMoE)."""
    moe = _moe(df)
    return moe[moe["router_block_size"].fillna(1) == 1]


# -- 1 ----------------------------------------------------------------------------------------
def _expert_count_row(sub: pd.DataFrame, noise: float | None) -> dict:
    """One curve of loss vs S at fixed active parameters: slope per doubling of total parameters,
    and whether it falls (beyond the noise; without seeds on >= 2/3 of steps) without rising
    beyond the noise at any step."""
    by = sub.groupby("sparsity").agg(val_loss=("val_loss", "mean"), total=("total_params", "mean"),
                                     n=("val_loss", "size"))
    n = int(by["n"].min())
    slope = float(np.polyfit(np.log2(by["total"].astype(float)), by["val_loss"], 1)[0])
    diffs = np.diff(by["val_loss"].to_numpy())
    share = float(np.mean(diffs < 0))
    change = float(by["val_loss"].iloc[-1] - by["val_loss"].iloc[0])
    sig = beyond_noise(change, noise, n)
    rises = int(sum(d > 0 and beyond_noise(d, noise, n) is True for d in diffs))
    falls = slope < 0 and change < 0 and rises == 0 and (sig if sig is not None else share >= 2 / 3)
    against = rises > 0 or (slope > 0 and (sig if sig is not None else share <= 1 / 3))
    return {"scale": sub["scale"].iloc[0], "active_params": int(sub["active_params"].iloc[0]),
            "granularity": sub["granularity"].iloc[0], "S": f"{by.index.min():g}-{by.index.max():g}",
            "slope_per_doubling": slope, "share_of_steps_falling": share, "loss_change": change,
            "rises_beyond_noise": rises, "falls": falls, "against": against, "_curve": by}


def expert_count(df: pd.DataFrame, noise: float | None) -> Finding:
    """Loss vs total expert parameters at fixed active parameters. Per controlled group (a scale,
    a granularity, ...; one active-parameter count) with >= 3 sparsities: the slope of val_loss
    per doubling of total parameters. Reproduced: every curve falls from the smallest to the
    largest S beyond the noise and never rises beyond it between consecutive S (monotone).
    Contradicted: a curve rises, overall or at one step, beyond the noise."""
    groups = _controlled(_moe(df), ["sparsity", "num_experts", "expert_width"], min_levels=3)
    rows = [_expert_count_row(sub, noise) for g in groups
            for _, sub in g.groupby("active_params") if sub["sparsity"].nunique() >= 3]
    table = pd.DataFrame(rows)
    f = Finding("expert_count", "1. Loss falls with total expert parameters",
                "At fixed active parameters, loss improves monotonically with total MoE parameters (up to S = 128).",
                INCONCLUSIVE, "no sweep varies the expert count at fixed active parameters", noise=noise)
    if table.empty:
        return f
    verdict = REPRODUCED if table["falls"].all() else CONTRADICTED if table["against"].any() else INCONCLUSIVE
    per_scale = table.groupby("scale")["slope_per_doubling"].mean()
    f.checks = [Check("loss falls monotonically with total parameters at fixed active", verdict,
                      float(table["slope_per_doubling"].mean()),
                      "slope per doubling of total parameters by scale: "
                      + ", ".join(f"{s} {v:+.4f}" for s, v in per_scale.items())
                      + f"; {int(table['falls'].sum())}/{len(table)} curves fall monotonically; S up to "
                      + f"{max(float(r['_curve'].index.max()) for r in rows):g}")]
    f.table = table.drop(columns=["_curve", "falls", "against"])

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            c = r["_curve"]
            ax.plot(c["total"], c["val_loss"], marker="o", label=f"{r['scale']} g={r['granularity']:g}")
        ax.set_xscale("log"), ax.set_xlabel("total parameters"), ax.set_ylabel("validation loss"), ax.legend(fontsize=7)
    f.plot = plot
    return _judge(f)


# -- 2 ----------------------------------------------------------------------------------------
_GRANULARITY_MOVES = ["granularity", "num_experts", "top_k", "expert_width"]
_INVARIANT = "best g invariant to total parameters (across S at fixed active)"
_MOVES = "best g moves with active parameters (across scales)"


def _granularity_curves(df: pd.DataFrame, noise: float | None) -> list[dict]:
    """Loss vs g per controlled group (>= 3 granularities), with `tol`: how far above a curve's
    minimum a g is still near-optimal (the noise; 0, the argmin alone, when it is unknown). A
    family is the curves over one g grid whose settings differ in S alone."""
    family_cols = [c for c in SETTINGS if c not in _GRANULARITY_MOVES + ["sparsity"]]
    curves = []
    for g in _controlled(_moe(df), _GRANULARITY_MOVES, min_levels=3):
        by = mean_by(g, "granularity").sort_index()
        n = int(g.groupby("granularity")["val_loss"].size().min())
        curves.append({"scale": g["scale"].iloc[0], "active_params": int(g["active_params"].iloc[0]),
                       "S": float(g["sparsity"].iloc[0]), "grid": tuple(by.index),
                       "family": _key(g.iloc[:1], family_cols).iloc[0] + str(tuple(by.index)),
                       "n": n, "tol": _tol(noise, n), "range": float(by.max() - by.min()), "curve": by})
    return curves


def _near_and_best(curves: list[dict]) -> tuple[set, list[float]]:
    """For curves over one g grid: the g near-optimal on every curve, and each curve's argmin."""
    near = [{g for g, y in c["curve"].items() if y - c["curve"].min() <= c["tol"]} for c in curves]
    return set.intersection(*near), [float(c["curve"].idxmin()) for c in curves]


def _invariance_check(curves: list[dict]) -> Check:
    """Half 1: at fixed active parameters (a family: all settings but S and g equal), some g is
    near-optimal at every S. Effect: over families, the largest loss cost of the best common g
    (one g for every S) over each curve's own minimum."""
    families: dict[str, list[dict]] = {}
    for c in sorted(curves, key=lambda c: c["S"]):
        families.setdefault(c["family"], []).append(c)
    judged = [(cs, _near_and_best(cs)) for cs in families.values() if len(cs) >= 2]
    if not judged:
        return Check(_INVARIANT, NOT_TESTED, detail="no scale has granularity curves over the same g at two sparsities")
    agree = [bool(near) for _, (near, _) in judged]
    cost = max(min(max(float(c["curve"][g] - c["curve"].min()) for c in cs) for g in cs[0]["grid"]) for cs, _ in judged)
    listing = "; ".join(f"{cs[0]['scale']}: " + ", ".join(f"S={c['S']:g} {b:g}" for c, b in zip(cs, best))
                        for cs, (_, best) in judged)
    return Check(_INVARIANT, REPRODUCED if all(agree) else CONTRADICTED, cost,
                 f"best g per sparsity: {listing}; one g is near-optimal at every S in {sum(agree)}/{len(judged)} "
                 f"families (scale, g grid); the best common g costs at most {cost:.4f} over each curve's minimum")


def _moves_check(curves: list[dict], noise: float | None) -> Check:
    """Half 2: the best g moves with active parameters: no g is near-optimal at both the smallest
    and the largest active size. Contradicted: one is, while granularity matters beyond the noise
    at both. Effect: octaves from the smallest to the largest active size's best g."""
    sizes = sorted({c["active_params"] for c in curves})
    grids = {c["grid"] for c in curves if c["active_params"] == sizes[0]}
    grids &= {c["grid"] for c in curves if c["active_params"] == sizes[-1]}
    if len(sizes) < 2 or not grids:
        return Check(_MOVES, NOT_TESTED, detail="no granularity curves over the same g at two active sizes")
    grid = max(grids, key=len)  # the finest grid both sizes were swept on
    ends = [[c for c in curves if c["active_params"] == a and c["grid"] == grid] for a in (sizes[0], sizes[-1])]
    found = [_near_and_best(cs) for cs in ends]
    best = [float(pd.Series(b).mode().iloc[0]) for _, b in found]
    near = [n or {b} for (n, _), b in zip(found, best)]
    sharp = all(any(_spread_beyond(c["range"], noise, c["n"]) is not False for c in cs) for cs in ends)
    verdict = REPRODUCED if not near[0] & near[1] else CONTRADICTED if sharp else INCONCLUSIVE
    octaves = math.log2(best[1] / best[0])
    return Check(_MOVES, verdict, octaves,
                 f"best g: {sizes[0]:.3g} active {best[0]:g}, {sizes[-1]:.3g} active {best[1]:g} (over g = "
                 + ", ".join(f"{g:g}" for g in grid) + f"); the effect is in octaves of g: {octaves:+.1f}")


def best_granularity(df: pd.DataFrame, noise: float | None) -> Finding:
    """The best granularity depends on active parameters only; both halves are sub-claims. Curves
    are loss vs g (>= 3 values) per scale and sparsity; g is near-optimal within the noise of a
    curve's minimum. Invariance: per scale, some g is near-optimal at every S. Moves: no g is
    near-optimal at both the smallest and the largest active size. Inconclusive when granularity
    moves loss within the noise everywhere."""
    curves = _granularity_curves(df, noise)
    f = Finding("granularity", "2. Best granularity depends on active parameters",
                "The optimal expert size depends on active parameters only: invariant to total parameters (S) at "
                "fixed active parameters, moving with the active size.", INCONCLUSIVE,
                "no sweep varies granularity over >= 3 values", noise=noise)
    if not curves:
        return f
    f.table = pd.DataFrame([{"scale": c["scale"], "active_params": c["active_params"], "S": c["S"],
                             "best_g": float(c["curve"].idxmin()), "best_loss": float(c["curve"].min()),
                             "loss_range": c["range"]} for c in curves])
    if not any(_spread_beyond(c["range"], noise, c["n"]) is not False for c in curves):
        flat = f"granularity moves loss by at most {f.table['loss_range'].max():.4f}, within the noise"
        f.checks = [Check(_INVARIANT, INCONCLUSIVE, detail=flat), Check(_MOVES, INCONCLUSIVE, detail=flat)]
    else:
        f.checks = [_invariance_check(curves), _moves_check(curves, noise)]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for c in curves:
            ax.plot(c["curve"].index, c["curve"].values, marker="o", label=f"{c['scale']} S={c['S']:g}")
        ax.set_xscale("log", base=2), ax.set_xlabel("granularity g"), ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    f.plot = plot
    return _judge(f)


# -- 3 ----------------------------------------------------------------------------------------
def _shared_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Shared-expert trials against the plain MoE (no shared expert, one set) of the same seed and
    settings apart from the routed experts, at total parameters within MATCHED_TOTAL_TOLERANCE:
    one row per (shared variant, plain setting). Also how many shared trials had no such partner."""
    shared = df[(df["layout"] == "layerwise") & (df["shared_experts"].fillna(0) > 0)]
    p = _pairs(shared, _moe(df), _but("sparsity", "num_experts", "top_k", "shared_experts", "shared_granularity"))
    p = p[(p["total_params"] / p["total_params_ref"] - 1).abs() <= MATCHED_TOTAL_TOLERANCE]
    table = _per_comparison(p, ["scale", "shared_experts", "shared_granularity", "sparsity", "total_params",
                                "total_params_ref"])
    unmatched = int((~shared["trial_id"].isin(p["trial_id"])).sum())
    return table.rename(columns={"delta": "loss_minus_plain"}), unmatched


def _effect(df: pd.DataFrame, factors: list[str], primary: str | None, same_sweep: bool) -> tuple[float, int]:
    """Mean over controlled groups of the range of mean loss across the factors' levels."""
    ranges = [float(mean_by(g, factors).max() - mean_by(g, factors).min())
              for g in _controlled(df, factors, primary=primary, same_sweep=same_sweep)]
    return (float(np.mean(ranges)) if ranges else float("nan")), len(ranges)


def _factor_effects(df: pd.DataFrame, shared: pd.DataFrame) -> pd.DataFrame:
    """Effect size per factor: the mean range of loss across its levels in controlled groups. Shared
    experts: across the plain MoE and its matched-total non-generalist shared variants. Balancing:
    over the reasonable settings only (its failure modes are finding 6)."""
    rows = []
    for name, cols, primary in [("expert count (S)", ["sparsity", "num_experts", "expert_width"], "sparsity"),
                                ("granularity", _GRANULARITY_MOVES, "granularity")]:
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
    vanilla = _vanilla(df)
    reasonable = [_balancing_class(a, b) == "reasonable" for a, b in zip(vanilla["aux_weight"], vanilla["bias_rate"])]
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
        f"{r['factor']} {_fmt(r['effect'])} ({r['groups']} groups)" for r in table.to_dict("records") if r["groups"])
    if not len(major) or not len(minor):
        return Check(claim, NOT_TESTED, detail=detail + "; needs both a major and a minor factor swept")
    if noise is not None and not beyond_noise(major.min(), noise):
        return Check(claim, INCONCLUSIVE, float(minor.max()),
                     detail + "; expert count and granularity themselves move loss within the noise")
    verdict = REPRODUCED if minor.max() < major.min() else CONTRADICTED if minor.min() > major.max() else INCONCLUSIVE
    return Check(claim, verdict, float(minor.max()), detail)


def _generalist_check(shared: pd.DataFrame, unmatched: int, noise: float | None) -> Check:
    """Generalists (g_s >= 1/2) hurt consistently: worse than the plain MoE at matched total
    parameters in every comparison, beyond the noise (`_rule`)."""
    claim = "generalist experts hurt in every comparison"
    gen = shared[shared["shared_granularity"] >= GENERALIST_MIN_GRANULARITY]
    left_out = (f"; {unmatched} shared trials left out (total parameters not within {MATCHED_TOTAL_TOLERANCE:.0%} "
                "of a plain MoE)")
    if gen.empty:
        return Check(claim, NOT_TESTED, detail="no generalist has a plain MoE of matched total parameters" + left_out)
    d = gen["loss_minus_plain"]
    pairs = _listing(gen, lambda r: f"{r['scale']} S={r['sparsity']:g}", "loss_minus_plain")
    detail = (f"generalist minus plain MoE at matched total parameters (within {MATCHED_TOTAL_TOLERANCE:.0%}), paired "
              f"by seed: {pairs}; mean {d.mean():+.4f} over {len(d)} comparisons" + left_out)
    return Check(claim, _rule(list(zip(d, gen["seeds"])), noise, +1), float(d.mean()), detail)


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
    return _judge(f)


# -- 4 ----------------------------------------------------------------------------------------
def _dropless_check(t: pd.DataFrame, option: str, noise: float | None) -> Check:
    """Reproduced: mean loss(dropping) - loss(dropless) > 0, >= 2/3 of comparisons positive, beyond
    the noise. Contradicted: mean < 0 with <= 1/3 positive, beyond the noise."""
    claim = f"dropless beats {OVERFLOW_OPTIONS[option]}"
    if t.empty:
        return Check(claim, NOT_TESTED, detail=f"no capacity-factor trial with overflow '{option}' pairs with a "
                                               "dropless one")
    d = t["loss_minus_dropless"]
    pos = float((d > 0).mean())
    big = beyond_noise(d.mean(), noise, int(t["seeds"].min())) is not False
    verdict = (REPRODUCED if d.mean() > 0 and pos >= 2 / 3 and big
               else CONTRADICTED if d.mean() < 0 and pos <= 1 / 3 and big else INCONCLUSIVE)
    by_cf = t.groupby("capacity_factor")["loss_minus_dropless"].mean()
    return Check(claim, verdict, float(d.mean()),
                 f"loss - loss(dropless): mean {d.mean():+.4f} over {len(d)} comparisons, {pos:.0%} positive; "
                 "by capacity factor " + ", ".join(f"{cf:g}: {v:+.4f}" for cf, v in by_cf.items()))


def dropless(df: pd.DataFrame, noise: float | None) -> Finding:
    """Dropless beats token dropping, against each overflow option separately (dropping the
    overflow tokens; routing them to a default expert). Paired by seed: a capacity-factor trial
    and the dropless trial with every other setting equal."""
    moe = df[df["layout"] != "dense"]
    p = _pairs(moe[moe["capacity_factor"].notna()], moe[moe["capacity_factor"].isna()],
               _but("capacity_factor", "overflow"))
    table = _per_comparison(p, ["scale", "sparsity", "granularity", "capacity_factor", "overflow"])
    table = table.rename(columns={"delta": "loss_minus_dropless"}).drop(columns=["setting", "setting_ref"])
    f = Finding("dropless", "4. Dropless routing beats token dropping",
                "Dropless routing gives a small, consistent gain over capacity-factor routing, whether overflow tokens "
                "are dropped or sent to a default expert.", INCONCLUSIVE,
                "no sweep pairs dropless with capacity-factor trials", table, noise)
    if table.empty:
        return f
    f.checks = [_dropless_check(table[table["overflow"] == o], o, noise) for o in OVERFLOW_OPTIONS]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        m = table.groupby(["overflow", "capacity_factor"])["loss_minus_dropless"]
        ax.bar([f"{o}\n{c:g}" for o, c in m.mean().index], m.mean().values, yerr=m.std().fillna(0).values)
        ax.axhline(0, color="k", lw=0.8), ax.set_xlabel("overflow option, capacity factor")
        ax.set_ylabel("loss - loss(dropless)")
    f.plot = plot
    return _judge(f)


# -- 5 ----------------------------------------------------------------------------------------
_LOSES, _WINS, _TIE = "MoE loses", "MoE wins", "tie"
_REVERSED = "MoE wins at small and loses at large budgets"


def _outcome(d: float, noise: float | None, n: int) -> str:
    if d == 0 or beyond_noise(d, noise, n) is False:
        return _TIE
    return _LOSES if d > 0 else _WINS


def _read_series(t: pd.DataFrame) -> tuple[str, float | None]:
    """One MoE setting's MoE - dense over its budgets (sorted by FLOPs): what it shows, and the
    threshold (the budget from which MoE wins at every larger one) when it crosses."""
    o = t["outcome"].tolist()
    if len(o) < 2:
        return "one budget only", None
    if o[0] == _LOSES and o[-1] == _WINS:
        threshold = float(t["train_flops"].iloc[max(i for i, x in enumerate(o) if x != _WINS) + 1])
        return f"MoE loses below and wins from {threshold:.3g} FLOPs", threshold
    if o[0] == _WINS and o[-1] == _LOSES:
        return _REVERSED, None
    if len(set(o)) == 1:
        return (f"{o[0]} at every budget tested" if o[0] != _TIE else "within the noise at every budget tested"), None
    return "no crossing from losing to winning", None


def compute_threshold(df: pd.DataFrame, noise: float | None) -> Finding:
    """The compute below which MoE loses to its dense baseline. Pairs: a layer-wise MoE and the
    dense trial of the same scale, seed and training budget (tokens and FLOPs). Per MoE setting,
    over budgets: reproduced when MoE loses (beyond the noise) at the smallest budget and wins at
    the largest, in some setting and reversed in none; contradicted: the reverse order only. The
    evidence text is generated from the table's rows."""
    keys = ["scale", "train_tokens", "train_flops", "lr", "batch_tokens", "data_source", "d_model", "n_layers", "seed"]
    moe = df[df["layout"] == "layerwise"]
    moe = moe.assign(series=_key(moe, [c for c in SETTINGS if c != "train_tokens"]))  # one MoE setting over budgets
    p = _pairs(moe, df[df["layout"] == "dense"], keys)
    table = _per_comparison(p, ["series", "scale", "train_flops", "train_tokens", "sparsity", "granularity"])
    table = table.rename(columns={"delta": "moe_minus_dense"}).drop(columns=["setting", "setting_ref"])
    f = Finding("threshold", "5. Below a compute threshold MoE loses to dense",
                "Below a compute threshold MoE underperforms its dense baseline (unless given more data).",
                INCONCLUSIVE, "no sweep has dense and MoE trials at equal scale and training budget", table, noise)
    if table.empty:
        return f
    table["outcome"] = [_outcome(d, noise, int(n)) for d, n in zip(table["moe_minus_dense"], table["seeds"])]
    table = table.sort_values(["scale", "sparsity", "granularity", "train_flops"])
    readings, parts = [], []
    for _, t in table.groupby("series", sort=False):
        reading, threshold = _read_series(t)
        readings.append((reading, threshold))
        r = t.iloc[0]
        budgets = zip(t["train_flops"], t["moe_minus_dense"], t["outcome"])
        parts.append(f"{r['scale']} S={r['sparsity']:g} g={r['granularity']:g}: "
                     + ", ".join(f"{x:.3g} FLOPs {d:+.4f} ({o})" for x, d, o in budgets) + f" -> {reading}")
    crossing = [thr for _, thr in readings if thr is not None]
    reversed_ = sum(reading == _REVERSED for reading, _ in readings)
    judged = sum(reading != "one budget only" for reading, _ in readings)
    verdict = (NOT_TESTED if not judged else REPRODUCED if crossing and not reversed_
               else CONTRADICTED if reversed_ and not crossing else INCONCLUSIVE)
    counts = table["outcome"].value_counts()
    threshold = f"threshold (the effect) {min(crossing):.3g} training FLOPs; " if crossing else ""
    f.checks = [Check("MoE loses below a compute threshold and wins above it", verdict,
                      min(crossing) if crossing else None,
                      f"{threshold}MoE - dense at equal scale and budget: {counts.get(_WINS, 0)} wins, "
                      f"{counts.get(_LOSES, 0)} losses, {counts.get(_TIE, 0)} ties of {len(table)}; "
                      + "; ".join(parts))]
    f.table = table.drop(columns="series")

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for (scale, s), g in table.groupby(["scale", "sparsity"]):
            ax.plot(g["train_flops"], g["moe_minus_dense"], marker="o", label=f"{scale} S={s:g}")
        ax.axhline(0, color="k", lw=0.8), ax.set_xscale("log"), ax.set_xlabel("training FLOPs")
        ax.set_ylabel("loss(MoE) - loss(dense)"), ax.legend(fontsize=7)
    f.plot = plot
    return _judge(f)


# -- 6 ----------------------------------------------------------------------------------------
def _balancing_class(aux: float, bias: float) -> str:
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
    cls = pd.Series([_balancing_class(a, b) for a, b in zip(g["aux_weight"], g["bias_rate"])], index=g.index)
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
    ok = [(_spread_beyond(r["reasonable_range"], noise, r["seeds"]) is False) if noise is not None
          else r["reasonable_range"] <= 0.01 * r["mean_loss"] for r in table.to_dict("records")]
    return Check(claim, REPRODUCED if all(ok) else CONTRADICTED, float(table["reasonable_range"].max()),
                 f"loss range over reasonable settings (aux in [{AUX_REASONABLE[0]:g}, {AUX_REASONABLE[1]:g}] or bias "
                 f"rate in (0, {BIAS_MODERATE_MAX:g}]), by expert count: "
                 + ", ".join(f"{r['scale']} n={r['num_experts']}: {r['reasonable_range']:.4f}"
                             for r in table.to_dict("records")))


def _group_label(r: dict) -> str:
    return f"{r['scale']} n={r['num_experts']}:"


def _low_aux_check(table: pd.DataFrame, noise: float | None, has_load: bool) -> Check:
    """Low aux weight without bias is worse than the reasonable settings in every group (`_rule`),
    and, where the steps table logs routing/max_load, more imbalanced too."""
    claim = f"low aux weight (< {AUX_REASONABLE[0]:g}) without bias: worse loss and higher imbalance"
    t = table.dropna(subset=["low_aux_minus_reasonable"])
    if t.empty:
        return Check(claim, NOT_TESTED, detail="no low aux weight without bias shares a group with reasonable settings")
    verdict = _rule(list(zip(t["low_aux_minus_reasonable"], t["seeds"])), noise, +1)
    detail = "loss minus reasonable: " + _listing(t, _group_label, "low_aux_minus_reasonable")
    load = t.dropna(subset=["low_aux_max_load_minus_reasonable"])
    if has_load and len(load):
        detail += ("; imbalance (last logged routing/max_load) minus reasonable: "
                   + _listing(load, _group_label, "low_aux_max_load_minus_reasonable", 3))
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
    hurts = _rule([(float(top["harm"]), int(top["seeds"]))], noise, +1)
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
    moe = _vanilla(df).merge(_last_routing(steps, ["max_load"]), on="trial_id", how="left")
    has_load = "max_load" in moe
    moe = moe if has_load else moe.assign(max_load=np.nan)
    rows = [r for g in _controlled(moe, ["aux_weight", "bias_rate"]) if (r := _balancing_row(g)) is not None]
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
             for g in _controlled(moe, ["aux_weight", "bias_rate"], min_levels=4)
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
    return _judge(f)


# -- 7 ----------------------------------------------------------------------------------------
def _pool_kind(group_size: float, n_layers: float, fraction: float) -> str:
    if not pd.isna(group_size) and group_size < n_layers:
        return "per-layer pools" if group_size == 1 else "grouped pools"
    return "full pool" if math.isclose(fraction, 1.0, rel_tol=1e-6) else "reduced pool"


def _unipool_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Each UniPool trial paired with each vanilla trial that differs in the pool alone (same
    seed, scale, top-k, granularity and training; UNIPOOL_RECIPE may differ) at the same or a
    larger per-layer sparsity: `pool_fraction` = UniPool's S over vanilla's, and its `kind`."""
    p = _pairs(df[df["layout"] == "unipool"], _vanilla(df), _but(*UNIPOOL_RECIPE))
    p = p[p["sparsity"] <= p["sparsity_ref"] * (1 + 1e-9)]
    p = p.assign(pool_fraction=p["sparsity"] / p["sparsity_ref"])
    return p.assign(kind=[_pool_kind(*v) for v in zip(p["pool_group_size"], p["n_layers"], p["pool_fraction"])])


def _full_pool_check(t: pd.DataFrame, noise: float | None) -> Check:
    """The full pool with its pool balance loss beats vanilla in every comparison (`_rule`); one
    without the pool loss is not UniPool's recipe and is only reported."""
    claim = "the full pool (M = vanilla experts per layer x layers, one pool) beats vanilla at every scale"
    full = t[(t["kind"] == "full pool") & (t["pool_weight"] > 0)]
    if full.empty:
        return Check(claim, NOT_TESTED, detail="no full-pool trial pairs with a vanilla one")
    off = t[(t["kind"] == "full pool") & (t["pool_weight"] <= 0)]
    detail = "UniPool - vanilla, paired by seed: " + _listing(
        full, lambda r: f"{r['scale']} (pool weight {r['pool_weight']:g})", "delta")
    if len(off):
        detail += "; without the pool balance loss (reported, not judged): " + _listing(
            off, lambda r: r["scale"], "delta")
    return Check(claim, _rule(list(zip(full["delta"], full["seeds"])), noise, -1), float(full["delta"].mean()), detail)


def _reduced_check(t: pd.DataFrame, noise: float | None) -> Check:
    """Every one-pool UniPool of UNIPOOL_REDUCED_RANGE of the budget is no worse than vanilla
    beyond the noise. Reports the curve per scale and the smallest pool that matches."""
    lo, hi = UNIPOOL_REDUCED_RANGE
    claim = f"reduced pools of {lo:.1%}-{hi:.1%} of the budget still match vanilla"
    one = t[t["kind"].isin(["full pool", "reduced pool"]) & (t["pool_weight"] > 0)].sort_values("pool_fraction")
    one = one.assign(matches=[d <= _tol(noise, int(n)) for d, n in zip(one["delta"], one["seeds"])])
    smallest = {s: f"{g[g['matches']]['pool_fraction'].min():.3g}" if g["matches"].any() else "none"
                for s, g in one.groupby("scale")}
    curve = "; ".join(f"{s}: " + _listing(g, lambda r: f"{r['pool_fraction']:.3g}", "delta")
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
    tol = np.array([_tol(noise, int(n)) for n in judged["seeds"]])
    between = (judged["delta"] >= judged["delta_full"] - tol) & (judged["delta"] <= tol)
    listing = "; ".join(f"{s}: " + _listing(g, lambda r: f"G={r['pool_group_size']:g}", "delta")
                        for s, g in groups.groupby("scale"))
    return Check(claim, REPRODUCED if between.all() else CONTRADICTED, float(judged["delta"].mean()),
                 f"loss - vanilla by pool group size: {listing}; full pool: "
                 + _listing(full, lambda r: r["scale"], "delta"), required=False)


def unipool(df: pd.DataFrame, noise: float | None) -> Finding:
    """UniPool against vanilla, only between trials that differ in the pool alone (paired by
    seed). Each kind of pool is its own comparison: the full pool (the verdict), reduced pools (a
    smaller fraction of the vanilla budget) and pools grouped by G layers (supporting), each pool
    weight separately; a full pool without the pool balance loss is not UniPool's recipe and is
    reported only."""
    cols = ["scale", "kind", "pool_group_size", "pool_fraction", "pool_weight", "sparsity_ref", "aux_weight_ref"]
    table = _per_comparison(_unipool_pairs(df), cols)
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
    return _judge(f)


# -- 8 ----------------------------------------------------------------------------------------
def _probe_noise(df: pd.DataFrame) -> float | None:
    """Seed noise of the routing probe's loss increase (its own replicates, not val_loss's)."""
    have = df[df["probe_loss_increase"].notna()]
    return seed_noise(have.assign(val_loss=have["probe_loss_increase"])) if len(have) else None


def _headline_check(moe: pd.DataFrame, noise: float | None) -> Check:
    """Block-shared routers (B > 1) without aux loss vs independent routers (B = 1) with aux
    PATHMOE_BASELINE_AUX, paired by seed; judged at B = PATHMOE_MAIN_BLOCK where tested (else at
    every B > 1): each must win beyond the noise (`_rule`)."""
    claim = (f"B = {PATHMOE_MAIN_BLOCK} routers without aux loss beat independent routers with aux "
             f"{PATHMOE_BASELINE_AUX:g}")
    b, aux = moe["router_block_size"].fillna(1), moe["aux_weight"].fillna(0)
    p = _pairs(moe[(b > 1) & (aux == 0)], moe[(b == 1) & np.isclose(aux, PATHMOE_BASELINE_AUX)],
               _but("router_block_size", "aux_weight"))
    t = _per_comparison(p, ["scale", "router_block_size"]).sort_values(["scale", "router_block_size"])
    if t.empty:
        return Check(claim, NOT_TESTED, detail=f"no aux-free B > 1 trial pairs with a B = 1 trial at aux "
                                               f"{PATHMOE_BASELINE_AUX:g}")
    main = t[t["router_block_size"] == PATHMOE_MAIN_BLOCK]
    main = main if len(main) else t
    detail = (f"loss(B, no aux) - loss(B = 1, aux {PATHMOE_BASELINE_AUX:g}), paired by seed: "
              + _listing(t, lambda r: f"{r['scale']} B={r['router_block_size']:g}", "delta"))
    return Check(claim, _rule(list(zip(main["delta"], main["seeds"])), noise, -1), float(main["delta"].mean()), detail)


def _by_block(moe: pd.DataFrame) -> pd.DataFrame:
    """Per controlled group over B (same aux weight): mean loss, overlap, entropy and probe by B."""
    rows = []
    for i, g in enumerate(_controlled(moe, ["router_block_size"])):
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
    rho = [spearman(g["B"].to_numpy(), g["jaccard"].to_numpy()) for _, g in table.groupby("group")]
    return Check(claim, verdict, float(np.mean([d for _, d in jac])),
                 "overlap (routing/jaccard, last logged) minus B = 1's: "
                 + ", ".join(f"{_block_label(r)} {d:+.3f}" for r, d in jac)
                 + "; entropy minus B = 1's: " + ", ".join(f"{_block_label(r)} {d:+.3f}" for r, d in ent)
                 + f"; rank corr of overlap with B: {', '.join(_fmt(x, 2) for x in rho)}; signs only", required=False)


def _robustness_check(table: pd.DataFrame, noise: float | None) -> Check:
    """At the same aux weight, B = 4 (or the largest B) loses less than B = 1 when one layer
    routes at random (the routing probe), beyond the probe's seed noise (`_rule`)."""
    claim = "shared routers are more robust to routing perturbation (routing probe)"
    d = _main_vs_independent(table, "probe")
    if not d:
        return Check(claim, NOT_TESTED, detail="no routing probe on both B = 1 and B > 1", required=False)
    return Check(claim, _rule([(x, int(r["seeds"])) for r, x in d], noise, -1), float(np.mean([x for _, x in d])),
                 "probe loss increase minus B = 1's: " + ", ".join(f"{_block_label(r)} {x:+.4f}" for r, x in d)
                 + f"; probe noise (sd) {_fmt(noise)}", required=False)


def pathmoe(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """Routers shared by blocks of B layers. Verdict: PathMoE's headline (`_headline_check`).
    Supporting, by B at a fixed aux weight: overlap up and entropy down (the steps table's last
    logged routing/jaccard and routing/entropy), and a smaller routing-probe loss increase."""
    moe = _moe(df).merge(_last_routing(steps, ["jaccard", "entropy"]), on="trial_id", how="left")
    moe = moe.assign(**{c: np.nan for c in ("jaccard", "entropy") if c not in moe})
    table = _by_block(moe)
    f = Finding("pathmoe", "8. Routers shared across layers (PathMoE)",
                f"Routers shared over blocks of B = {PATHMOE_MAIN_BLOCK} layers, without aux loss, beat independent "
                f"routers with aux {PATHMOE_BASELINE_AUX:g}; paths overlap more and withstand routing perturbation "
                "better.", INCONCLUSIVE, "no sweep varies the router block size", table, noise)
    if table.empty:
        return f
    f.checks = [_headline_check(moe, noise), _overlap_check(table), _robustness_check(table, _probe_noise(moe))]
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
    return _judge(f)


# -- 9 ----------------------------------------------------------------------------------------
def routing_probe(df: pd.DataFrame, noise: float | None) -> Finding:
    """Random routing in one deeper layer hurts UniPool more than vanilla MoE. Pairs: UniPool's
    full pool (with its pool loss) and the vanilla trial it differs from in the pool alone, same
    seed (`_unipool_pairs`), both probed. Reproduced: UniPool's increase is larger at every
    scale, beyond the probe's own seed noise (the val_loss noise when it has no replicates)."""
    p = _unipool_pairs(df)
    p = p[(p["kind"] == "full pool") & (p["pool_weight"] > 0)]
    p = p.assign(probe_delta=p["probe_loss_increase"] - p["probe_loss_increase_ref"]).dropna(subset=["probe_delta"])
    table = _per_comparison(p, ["scale"], ("probe_delta", "probe_loss_increase", "probe_loss_increase_ref"))
    table = table.drop(columns=["setting", "setting_ref"]).rename(
        columns={"probe_loss_increase": "unipool", "probe_loss_increase_ref": "vanilla"})
    probe_noise = _probe_noise(df)
    f = Finding("probe", "9. Routing probe: UniPool's routing matters more",
                "Replacing one deeper layer's routing with random choice costs UniPool more than vanilla MoE.",
                INCONCLUSIVE, "no probed UniPool trial pairs with a probed vanilla one (train.routing_probe)", table,
                probe_noise if probe_noise is not None else noise)
    if table.empty:
        return f
    f.checks = [Check("random routing costs UniPool more than vanilla at every scale",
                      _rule(list(zip(table["probe_delta"], table["seeds"])), f.noise, +1),
                      float(table["probe_delta"].mean()),
                      "loss increase, UniPool minus vanilla, paired by seed: "
                      + ", ".join(f"{r['scale']} {r['probe_delta']:+.4f} ({r['unipool']:.4f} vs {r['vanilla']:.4f})"
                                  for r in table.to_dict("records")))]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(table))
        ax.bar(x - 0.2, table["vanilla"], 0.4, label="vanilla"), ax.bar(x + 0.2, table["unipool"], 0.4, label="UniPool")
        ax.set_xticks(x, table["scale"]), ax.set_ylabel("loss increase, one layer routed at random")
        ax.legend(fontsize=7)
    f.plot = plot
    return _judge(f)


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
    df = prepare(trials)
    noise = seed_noise(df)
    steps = steps if steps is not None else pd.DataFrame()
    return [
        expert_count(df, noise), best_granularity(df, noise), small_effects(df, noise), dropless(df, noise),
        compute_threshold(df, noise), balancing(df, steps, noise), unipool(df, noise), pathmoe(df, steps, noise),
        routing_probe(df, noise), scaling_fit(df),
    ]

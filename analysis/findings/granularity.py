"""Finding 2: the best granularity depends on active parameters only (invariant to S, moving with
the active size)."""

from __future__ import annotations

import math

import pandas as pd

from analysis.findings.comparisons import controlled, plain_moe, row_keys
from analysis.findings.verdicts import (
    CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge, noise_tolerance, spread_beyond_noise,
)
from analysis.stats import SETTINGS, mean_by, seed_noise_dof

GRANULARITY_MOVES = ["granularity", "num_experts", "top_k", "expert_width"]
_INVARIANT = "best g invariant to total parameters (across S at fixed active)"
_MOVES = "best g moves with active parameters (across scales)"


def _granularity_curves(df: pd.DataFrame, noise: float | None, dof: float) -> list[dict]:
    """Loss vs g per controlled group (>= 3 granularities), with `tol`: how far above a curve's
    minimum a g is still near-optimal (the noise; 0, the argmin alone, when it is unknown), and
    `matters`: whether its range over the g values is beyond the noise (the studentized range over
    as many g; None when the noise is unknown). A family is the curves over one g grid whose
    settings differ in S alone."""
    family_cols = [c for c in SETTINGS if c not in GRANULARITY_MOVES + ["sparsity"]]
    curves = []
    for g in controlled(plain_moe(df), GRANULARITY_MOVES, min_levels=3):
        by = mean_by(g, "granularity").sort_index()
        n = int(g.groupby("granularity")["val_loss"].size().min())
        curves.append({"scale": g["scale"].iloc[0], "active_params": int(g["active_params"].iloc[0]),
                       "S": float(g["sparsity"].iloc[0]), "grid": tuple(by.index),
                       "family": row_keys(g.iloc[:1], family_cols).iloc[0] + str(tuple(by.index)),
                       "n": n, "tol": noise_tolerance(noise, n), "range": float(by.max() - by.min()), "curve": by,
                       "matters": spread_beyond_noise(float(by.max() - by.min()), noise, n, len(by), dof)})
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


def _moves_check(curves: list[dict]) -> Check:
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
    sharp = all(any(c["matters"] is not False for c in cs) for cs in ends)
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
    curves = _granularity_curves(df, noise, seed_noise_dof(df) or math.inf)
    f = Finding("granularity", "2. Best granularity depends on active parameters",
                "The optimal expert size depends on active parameters only: invariant to total parameters (S) at "
                "fixed active parameters, moving with the active size.", INCONCLUSIVE,
                "no sweep varies granularity over >= 3 values", noise=noise)
    if not curves:
        return f
    f.table = pd.DataFrame([{"scale": c["scale"], "active_params": c["active_params"], "S": c["S"],
                             "best_g": float(c["curve"].idxmin()), "best_loss": float(c["curve"].min()),
                             "loss_range": c["range"]} for c in curves])
    if not any(c["matters"] is not False for c in curves):
        flat = f"granularity moves loss by at most {f.table['loss_range'].max():.4f}, within the noise"
        f.checks = [Check(_INVARIANT, INCONCLUSIVE, detail=flat), Check(_MOVES, INCONCLUSIVE, detail=flat)]
    else:
        f.checks = [_invariance_check(curves), _moves_check(curves)]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for c in curves:
            ax.plot(c["curve"].index, c["curve"].values, marker="o", label=f"{c['scale']} S={c['S']:g}")
        ax.set_xscale("log", base=2), ax.set_xlabel("granularity g"), ax.set_ylabel("validation loss")
        ax.legend(fontsize=7)
    f.plot = plot
    return judge(f)


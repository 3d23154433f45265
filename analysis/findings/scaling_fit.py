"""The scaling fit: validation loss as a power law of active and total parameters with a
granularity optimum, and what it predicts for a compute budget."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.findings.verdicts import INCONCLUSIVE, Finding, fmt


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
    f.table = pd.DataFrame([{"c": c, "a_active": a, "b_total": b, "q_logg2": q, "r_logg_logNa": r, "r2": r2,
                             "points": len(d), "budget_flops": budget, "pred_active_params": na,
                             "pred_best_g": g_best}])
    f.verdict = "fit"
    f.summary = (f"log L = {c:.3f} {a:+.3f} log Na {b:+.3f} log Nt {q:+.4f} (log g)^2 {r:+.4f} log g log Na "
                 f"(R^2 {r2:.2f}, {len(d)} trials); "
                 f"at {budget:.2g} FLOPs: Na about {na:.3g}, best g about {fmt(g_best, 3)}, "
                 + ("more total parameters help (b < 0): the largest S affordable" if b < 0
                    else "total parameters do not help (b >= 0): S = 1"))

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.scatter(np.exp(pred), d["val_loss"], s=12)
        lo, hi = float(d["val_loss"].min()), float(d["val_loss"].max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8), ax.set_xlabel("fitted loss"), ax.set_ylabel("measured loss")
    f.plot = plot
    return f

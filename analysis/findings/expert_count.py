"""Finding 1: at fixed active parameters, loss falls monotonically with total expert parameters."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.comparisons import controlled, plain_moe
from analysis.findings.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCED, Check, Finding, judge
from analysis.stats import beyond_noise


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
    groups = controlled(plain_moe(df), ["sparsity", "num_experts", "expert_width"], min_levels=3)
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
    return judge(f)


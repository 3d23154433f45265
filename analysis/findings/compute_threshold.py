"""Finding 5: below a compute threshold MoE loses to its dense baseline, above it MoE wins."""

from __future__ import annotations

import pandas as pd

from analysis.findings.comparisons import pair_trials, per_comparison, row_keys
from analysis.findings.verdicts import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge
from analysis.stats import SETTINGS, beyond_noise

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


def _threshold_check(table: pd.DataFrame) -> Check:
    """Each MoE setting's budgets read in order (`_read_series`): reproduced when some setting
    crosses from losing to winning and none is reversed; contradicted: reversed settings only;
    the threshold (the effect) is the smallest crossing budget."""
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
    return Check("MoE loses below a compute threshold and wins above it", verdict,
                 min(crossing) if crossing else None,
                 f"{threshold}MoE - dense at equal scale and budget: {counts.get(_WINS, 0)} wins, "
                 f"{counts.get(_LOSES, 0)} losses, {counts.get(_TIE, 0)} ties of {len(table)}; "
                 + "; ".join(parts))


def compute_threshold(df: pd.DataFrame, noise: float | None) -> Finding:
    """The compute below which MoE loses to its dense baseline. Pairs: a layer-wise MoE and the
    dense trial of the same scale, seed and training budget (tokens and FLOPs). Per MoE setting,
    over budgets: reproduced when MoE loses (beyond the noise) at the smallest budget and wins at
    the largest, in some setting and reversed in none; contradicted: the reverse order only. The
    evidence text is generated from the table's rows."""
    keys = ["scale", "train_tokens", "train_flops", "lr", "batch_tokens", "data_source", "d_model", "n_layers", "seed"]
    moe = df[df["layout"] == "layerwise"]
    moe = moe.assign(series=row_keys(moe, [c for c in SETTINGS if c != "train_tokens"]))  # one MoE setting over budgets
    p = pair_trials(moe, df[df["layout"] == "dense"], keys)
    table = per_comparison(p, ["series", "scale", "train_flops", "train_tokens", "sparsity", "granularity"])
    table = table.rename(columns={"delta": "moe_minus_dense"}).drop(columns=["setting", "setting_ref"])
    f = Finding("threshold", "5. Below a compute threshold MoE loses to dense",
                "Below a compute threshold MoE underperforms its dense baseline (unless given more data).",
                INCONCLUSIVE, "no sweep has dense and MoE trials at equal scale and training budget", table, noise)
    if table.empty:
        return f
    table["outcome"] = [_outcome(d, noise, int(n)) for d, n in zip(table["moe_minus_dense"], table["seeds"])]
    table = table.sort_values(["scale", "sparsity", "granularity", "train_flops"])
    f.checks = [_threshold_check(table)]
    f.table = table.drop(columns="series")

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for (scale, s), g in table.groupby(["scale", "sparsity"]):
            ax.plot(g["train_flops"], g["moe_minus_dense"], marker="o", label=f"{scale} S={s:g}")
        ax.axhline(0, color="k", lw=0.8), ax.set_xscale("log"), ax.set_xlabel("training FLOPs")
        ax.set_ylabel("loss(MoE) - loss(dense)"), ax.legend(fontsize=7)
    f.plot = plot
    return judge(f)


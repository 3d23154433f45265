"""Finding 9: random routing in one deeper layer costs UniPool more than vanilla MoE; and the
probe's own seed noise."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.comparisons import per_comparison
from analysis.findings.unipool import guard_silent, unipool_pairs
from analysis.findings.verdicts import INCONCLUSIVE, Check, Finding, judge, sign_rule
from analysis.stats import seed_noise


# The probe's measures, preferred first: UniPool's paper reports the accuracy drop; without
# downstream tasks (`train.downstream`) the validation-loss increase stands in for it.
MEASURES = (("probe_acc_drop", "accuracy drop"), ("probe_loss_increase", "loss increase"))


def probe_seed_noise(df: pd.DataFrame, column: str = "probe_loss_increase") -> float | None:
    """Seed noise of a probe measure (its own replicates, not val_loss's)."""
    have = df[df[column].notna()] if column in df else df.iloc[:0]
    return seed_noise(have.assign(val_loss=have[column])) if len(have) else None


def routing_probe(df: pd.DataFrame, steps: pd.DataFrame, noise: float | None) -> Finding:
    """Random routing in one deeper layer hurts UniPool more than vanilla MoE. Pairs: UniPool's
    full pool (with its pool loss) and the vanilla trial it differs from in the pool alone, same
    seed (`unipool_pairs`), both probed. Measured in accuracy when every pair has it, else in
    loss. Reproduced: UniPool's drop (or increase) is larger at every scale, beyond the probe's
    own seed noise (the val_loss noise when it has no replicates)."""
    p = unipool_pairs(df)
    p = p[(p["kind"] == "full pool") & (p["pool_weight"] > 0)]
    column, words = next(((c, w) for c, w in MEASURES if c in p and len(p) and p[c].notna().all()
                          and p[f"{c}_ref"].notna().all()), MEASURES[1])
    p = p.assign(probe_delta=p[column] - p[f"{column}_ref"]).dropna(subset=["probe_delta"])
    table = per_comparison(p, ["scale"], ("probe_delta", column, f"{column}_ref"))
    table = table.drop(columns=["setting", "setting_ref"]).rename(columns={column: "unipool", f"{column}_ref": "vanilla"})
    probe_noise = probe_seed_noise(df, column)
    f = Finding("probe", "9. Routing probe: UniPool's routing matters more",
                "Replacing one deeper layer's routing with random choice costs UniPool more than vanilla MoE.",
                INCONCLUSIVE, "no probed UniPool trial pairs with a probed vanilla one (train.routing_probe)", table,
                probe_noise if probe_noise is not None else (noise if column == "probe_loss_increase" else None))
    if table.empty:
        return f
    f.checks = [Check("random routing costs UniPool more than vanilla at every scale",
                      sign_rule(list(zip(table["probe_delta"], table["seeds"])), f.noise, +1),
                      float(table["probe_delta"].mean()),
                      f"{words}, UniPool minus vanilla, paired by seed: "
                      + ", ".join(f"{r['scale']} {r['probe_delta']:+.4f} ({r['unipool']:.4f} vs {r['vanilla']:.4f})"
                                  for r in table.to_dict("records")))]

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        x = np.arange(len(table))
        ax.bar(x - 0.2, table["vanilla"], 0.4, label="vanilla"), ax.bar(x + 0.2, table["unipool"], 0.4, label="UniPool")
        ax.set_xticks(x, table["scale"]), ax.set_ylabel(f"{words}, one layer routed at random")
        ax.legend(fontsize=7)
    f.plot = plot
    return guard_silent(judge(f), df, steps)

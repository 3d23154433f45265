"""Finding 9: random routing in one deeper layer costs UniPool more than vanilla MoE; and the
probe's own seed noise."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.findings.comparisons import per_comparison
from analysis.findings.unipool import unipool_pairs
from analysis.findings.verdicts import INCONCLUSIVE, Check, Finding, judge, sign_rule
from analysis.stats import seed_noise


def probe_seed_noise(df: pd.DataFrame) -> float | None:
    """Seed noise of the routing probe's loss increase (its own replicates, not val_loss's)."""
    have = df[df["probe_loss_increase"].notna()]
    return seed_noise(have.assign(val_loss=have["probe_loss_increase"])) if len(have) else None


def routing_probe(df: pd.DataFrame, noise: float | None) -> Finding:
    """Random routing in one deeper layer hurts UniPool more than vanilla MoE. Pairs: UniPool's
    full pool (with its pool loss) and the vanilla trial it differs from in the pool alone, same
    seed (`unipool_pairs`), both probed. Reproduced: UniPool's increase is larger at every
    scale, beyond the probe's own seed noise (the val_loss noise when it has no replicates)."""
    p = unipool_pairs(df)
    p = p[(p["kind"] == "full pool") & (p["pool_weight"] > 0)]
    p = p.assign(probe_delta=p["probe_loss_increase"] - p["probe_loss_increase_ref"]).dropna(subset=["probe_delta"])
    table = per_comparison(p, ["scale"], ("probe_delta", "probe_loss_increase", "probe_loss_increase_ref"))
    table = table.drop(columns=["setting", "setting_ref"]).rename(
        columns={"probe_loss_increase": "unipool", "probe_loss_increase_ref": "vanilla"})
    probe_noise = probe_seed_noise(df)
    f = Finding("probe", "9. Routing probe: UniPool's routing matters more",
                "Replacing one deeper layer's routing with random choice costs UniPool more than vanilla MoE.",
                INCONCLUSIVE, "no probed UniPool trial pairs with a probed vanilla one (train.routing_probe)", table,
                probe_noise if probe_noise is not None else noise)
    if table.empty:
        return f
    f.checks = [Check("random routing costs UniPool more than vanilla at every scale",
                      sign_rule(list(zip(table["probe_delta"], table["seeds"])), f.noise, +1),
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
    return judge(f)


"""Finding 4: dropless routing beats capacity-factor routing, for each overflow option."""

from __future__ import annotations

import pandas as pd

from analysis.findings.comparisons import all_but, pair_trials, per_comparison
from analysis.findings.verdicts import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding, judge
from analysis.stats import beyond_noise

OVERFLOW_OPTIONS = {"drop": "dropping overflow tokens", "default_expert": "routing overflow to a default expert"}


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
    p = pair_trials(moe[moe["capacity_factor"].notna()], moe[moe["capacity_factor"].isna()],
                    all_but("capacity_factor", "overflow"))
    table = per_comparison(p, ["scale", "sparsity", "granularity", "capacity_factor", "overflow"])
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
    return judge(f)


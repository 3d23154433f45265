"""Small-effect claims as the design study makes them: shared experts, heterogeneous experts and
balancing settings "have small effects relative to expert count and granularity" (finding 3), and
balancing is robust to the settings between its failure modes (finding 6).

A factor's effect is its spread: the largest range of seed-averaged loss over the factor's levels
in any controlled group, so how far the factor can move loss. Its confidence interval holds for
all of the factor's groups at once: within a group, Tukey's studentized range over its k settings
(`stats.range_interval`), so 11 noisy means do not look like an effect that 2 would not show;
across groups, Bonferroni. A small-effect claim compares that interval with the same measure of
expert count and granularity in the same tables. Where the tables do not measure both, the claim
is not judged: no ratio to an effect nobody measured is made up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.findings.comparisons import controlled
from analysis.findings.granularity import GRANULARITY_MOVES
from analysis.findings.verdicts import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, fmt
from analysis.stats import mean_by, range_interval, range_p_value, seed_noise_dof

# The study says "small relative to" without a number. We call an effect small when it is at most a
# quarter of the smaller of the expert-count and granularity effects: "small" asks more than
# "smaller" (a ratio of 1) or "clearly smaller" (1/2), and a tenth would claim an order of
# magnitude, more than the study's words. Over the study's S = 1-128 (seven doublings), a quarter of
# the expert-count effect is what about two doublings of S buy.
SMALL_RATIO = 0.25
LEVEL = 0.95  # every interval one factor's verdict rests on holds, all together, this often
# The effects "small" is relative to: factor columns (the settings that move with it) and the level.
REFERENCES = {"expert count (S)": (["sparsity", "num_experts", "expert_width"], "sparsity"),
              "granularity": (GRANULARITY_MOVES, "granularity")}


@dataclass
class Spread:
    """A factor's effect: the largest range of mean loss over its levels in one controlled group,
    with a LEVEL interval simultaneous over the groups (the point itself without repeated seeds)."""
    effect: float
    low: float
    high: float
    groups: int
    settings: int  # the most levels one group compares
    seeds: int  # the fewest seeds of a level
    p: float | None  # is any group's spread beyond the noise? Studentized range, Bonferroni over groups


def noise_dof(df: pd.DataFrame) -> float:
    """Degrees of freedom of the seed noise of `df` (infinite where it was not estimated there)."""
    return seed_noise_dof(df) or math.inf


def group_range(group: pd.DataFrame, by: list[str]) -> tuple[float, int, int]:
    """(range of mean loss over the levels of `by`, how many levels, the fewest seeds of a level)."""
    means = mean_by(group, by)
    seeds = int(group.groupby(by, dropna=False)["seed"].nunique().min())
    return float(means.max() - means.min()), len(means), seeds


def group_intervals(ranges: list[tuple[float, int, int]], noise: float | None,
                    dof: float) -> list[tuple[float, float, float | None]]:
    """Per (range, levels, seeds): its interval (low, high), simultaneous with the others' at LEVEL
    (Bonferroni), and the p-value of the studentized range (unadjusted; None without noise)."""
    level = 1 - (1 - LEVEL) / max(len(ranges), 1)
    return [range_interval(r, k, n, noise, dof, level) + (range_p_value(r, k, n, noise, dof),) for r, k, n in ranges]


def spread_of(ranges: list[tuple[float, int, int]], noise: float | None, dof: float) -> Spread | None:
    """The factor's spread over its groups' ranges (None without groups). The largest true range
    lies between the largest low and the largest high end whenever every group's interval holds."""
    if not ranges:
        return None
    bounds = group_intervals(ranges, noise, dof)
    p = None if noise is None else min(1.0, len(ranges) * min(b[2] for b in bounds))
    return Spread(max(r for r, _, _ in ranges), max(b[0] for b in bounds), max(b[1] for b in bounds), len(ranges),
                  max(k for _, k, _ in ranges), min(n for _, _, n in ranges), p)


def factor_spread(df: pd.DataFrame, factors: list[str], primary: str | None, noise: float | None, dof: float,
                  same_sweep: bool = False) -> Spread | None:
    """The spread of `factors` over the controlled groups of `df` (`comparisons.controlled`)."""
    groups = controlled(df, factors, primary=primary, same_sweep=same_sweep)
    return spread_of([group_range(g, factors) for g in groups], noise, dof)


def reference_spreads(df: pd.DataFrame, noise: float | None, dof: float) -> dict[str, Spread | None]:
    """The expert-count and granularity spreads of the tables (None where a factor is not swept)."""
    return {name: factor_spread(df, cols, primary, noise, dof) for name, (cols, primary) in REFERENCES.items()}


def pick_reference(refs: dict[str, Spread | None]) -> tuple[str, Spread] | None:
    """The smaller of the two reference effects: "small relative to both" is relative to it, so it
    needs both measured (None otherwise)."""
    if any(s is None for s in refs.values()):
        return None
    return min(refs.items(), key=lambda item: item[1].effect)


def small_verdict(spread: Spread | tuple[float, float], ref: tuple[str, Spread] | None) -> str:
    """Is the effect (a Spread, or an interval (low, high)) small against the reference? Reproduced:
    its high end is at most SMALL_RATIO of the reference's low end. Contradicted: its low end is
    above SMALL_RATIO of the reference's high end, so it is real (beyond the noise) and not small.
    Inconclusive between, or when the reference itself is within the noise; not tested without one."""
    low, high = (spread.low, spread.high) if isinstance(spread, Spread) else spread
    if ref is None:
        return NOT_TESTED
    r = ref[1]
    if r.low <= 0:
        return INCONCLUSIVE
    if high <= SMALL_RATIO * r.low:
        return REPRODUCED
    return CONTRADICTED if low > SMALL_RATIO * r.high else INCONCLUSIVE


def combine(verdicts: list[str]) -> str:
    """One verdict from several effects that must all be small."""
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return REPRODUCED if verdicts and all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE


def ratio_interval(low: float, high: float, ref: tuple[str, Spread] | None) -> tuple[float, float]:
    """The effect's interval as multiples of the reference effect (NaN without a reference beyond noise)."""
    if ref is None or ref[1].low <= 0:
        return math.nan, math.nan
    return low / ref[1].high, high / ref[1].low


def interval_text(effect: float, low: float, high: float, p: float | None = None) -> str:
    """"0.0031 [0.0000, 0.0098], p = 0.41": an effect, its interval and the noise test's p (left
    out when None or NaN: no repeated seeds)."""
    text = f"{fmt(effect)} [{fmt(low)}, {fmt(high)}]"
    return text + (f", p = {p:.2g}" if p is not None and not math.isnan(p) else "")


def reference_text(refs: dict[str, Spread | None], noise: float | None) -> str:
    """The references with their intervals, which one "small" is judged against, and the limit."""
    listing = ", ".join(f"{name} " + (interval_text(s.effect, s.low, s.high) + f" ({s.groups} groups)" if s else
                                      "not measured") for name, s in refs.items())
    how = (f"largest range of mean loss over a factor's levels in one controlled group, {LEVEL:.0%} interval "
           "simultaneous over its groups (Tukey's studentized range within a group, Bonferroni across)"
           if noise is not None else "largest range of mean loss over a factor's levels in one controlled "
           "group (no repeated seeds: points, no intervals)")
    ref = pick_reference(refs)
    if ref is None:
        missing = " and ".join(name for name, s in refs.items() if s is None)
        return (f"not judged: small is relative to expert count and granularity, and these tables do not measure "
                f"{missing} ({listing})")
    if ref[1].low <= 0:
        return f"{how}: {listing}; expert count and granularity themselves move loss within the noise"
    return (f"{how}: {listing}; small means at most {SMALL_RATIO:g} of the smaller, {ref[0]}: a high end of at "
            f"most {fmt(SMALL_RATIO * ref[1].low)}")

"""The study's findings, each computed from the result tables with its evidence and a verdict.

Every finding compares only trials that differ in the factor it is about (`stats.controlled_groups`,
or trials paired by seed and every other setting), judges effects against the seed noise where
the sweeps repeat seeds, and says `inconclusive` when the tables do not hold the comparison or the
effect is within the noise. A finding is the conjunction of its sub-claims (`Check`), each with its
own verdict and number, following the conditions in methods.md section 5. Without repeated seeds
the sign of an effect decides. Rules are stated in each function's docstring; thresholds are
deliberately simple so a reader can check them by hand.

`verdicts` holds the `Finding` and `Check` types and how verdicts are reached, `comparisons` which
trials are compared; every other module is one finding (or the scaling fit).
"""

from __future__ import annotations

import pandas as pd

from analysis.findings.balancing import balancing
from analysis.findings.comparisons import prepare
from analysis.findings.compute_threshold import compute_threshold
from analysis.findings.dropless import dropless
from analysis.findings.expert_count import expert_count
from analysis.findings.granularity import best_granularity
from analysis.findings.pathmoe import pathmoe
from analysis.findings.routing_probe import routing_probe
from analysis.findings.scaling_fit import scaling_fit
from analysis.findings.small_effects import small_effects
from analysis.findings.unipool import unipool
from analysis.findings.verdicts import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED, Check, Finding
from analysis.stats import seed_noise

__all__ = ["CONTRADICTED", "INCONCLUSIVE", "NOT_TESTED", "REPRODUCED", "Check", "Finding", "all_findings"]


def all_findings(trials: pd.DataFrame, steps: pd.DataFrame | None = None) -> list[Finding]:
    """Every finding (and the scaling fit) from a trials table and optionally its steps table."""
    df = prepare(trials)
    noise = seed_noise(df)
    steps = steps if steps is not None else pd.DataFrame()
    return [
        expert_count(df, noise), best_granularity(df, noise), small_effects(df, noise), dropless(df, noise),
        compute_threshold(df, noise), balancing(df, steps, noise), unipool(df, steps, noise), pathmoe(df, steps, noise),
        routing_probe(df, steps, noise), scaling_fit(df),
    ]

"""How a finding reaches its verdict: the `Finding` and `Check` types, how sub-claim verdicts
combine, the rules that judge an effect against the seed noise, and the evidence text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from analysis.stats import beyond_noise, difference_se, studentized_range_quantile

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
NOT_TESTED = "not tested"  # a sub-claim the tables hold no comparison for (never a finding's verdict)

# A spread of k settings "beyond the noise" is one pure noise exceeds at most this often, whatever k.
SPREAD_ALPHA = 0.05


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


def judge(f: Finding) -> Finding:
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


def fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _noise_text(noise: float | None) -> str:
    return f"seed noise (sd) {noise:.4f}" if noise is not None else "no repeated seeds: noise unknown"


def signed_list(rows: pd.DataFrame, label: Callable[[dict], str], col: str, digits: int = 4) -> str:
    """Each row's label and signed `col` value, comma-separated."""
    return ", ".join(f"{label(r)} {r[col]:+.{digits}f}" for r in rows.to_dict("records"))


def noise_tolerance(noise: float | None, n: int) -> float:
    """The largest difference of two n-seed means still within the noise (0 when it is unknown)."""
    return 2 * difference_se(noise, n) if noise is not None else 0.0


def spread_beyond_noise(spread: float, noise: float | None, n: int, k: int, dof: float = math.inf) -> bool | None:
    """Is the range of k n-seed means more than noise explains? The studentized range test at
    SPREAD_ALPHA, whose null distribution widens with k (a fixed number of standard errors does
    not). None if the noise is unknown."""
    if noise is None:
        return None
    return bool(spread > studentized_range_quantile(1 - SPREAD_ALPHA, k, dof) * noise / math.sqrt(max(n, 1)))


def sign_rule(effects: list[tuple[float, int]], noise: float | None, sign: int) -> str:
    """Claim: every effect (value, seeds) has `sign`. Reproduced when each does beyond the noise;
    contradicted when one has the other sign beyond it; not tested without effects."""
    if not effects:
        return NOT_TESTED
    if all(sign * e > 0 and beyond_noise(e, noise, n) is not False for e, n in effects):
        return REPRODUCED
    if any(sign * e < 0 and beyond_noise(e, noise, n) is not False for e, n in effects):
        return CONTRADICTED
    return INCONCLUSIVE


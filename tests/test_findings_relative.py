"""analysis.findings.relative: how a small-effect claim is judged against the expert-count and
granularity effects, with intervals that hold over all of a factor's groups."""

from __future__ import annotations

import math

import pytest

from analysis.findings import CONTRADICTED, INCONCLUSIVE, NOT_TESTED, REPRODUCED
from analysis.findings.relative import (
    SMALL_RATIO, Spread, combine, pick_reference, ratio_interval, reference_text, small_verdict, spread_of,
)
from analysis.stats import studentized_range_quantile


def spread(effect: float, low: float, high: float) -> Spread:
    return Spread(effect, low, high, groups=1, settings=2, seeds=3, p=None)


REFS = {"expert count (S)": spread(0.10, 0.09, 0.11), "granularity": spread(0.27, 0.26, 0.28)}
REF = pick_reference(REFS)


def test_the_reference_is_the_smaller_of_expert_count_and_granularity_and_needs_both():
    assert REF[0] == "expert count (S)"
    assert pick_reference({"expert count (S)": None, "granularity": REFS["granularity"]}) is None
    assert "do not measure expert count (S) (" in reference_text({**REFS, "expert count (S)": None}, 0.003)


@pytest.mark.parametrize("low, high, verdict", [
    (0.0, SMALL_RATIO * 0.09, REPRODUCED),  # the high end reaches a quarter of the reference's low end
    (0.0, SMALL_RATIO * 0.09 + 1e-4, INCONCLUSIVE),  # within the noise but not shown small
    (0.015, 0.02, REPRODUCED),  # beyond the noise (low > 0) and small: a real but tiny effect
    (SMALL_RATIO * 0.11, 0.04, INCONCLUSIVE),  # shown real, not shown beyond a quarter of the reference
    (SMALL_RATIO * 0.11 + 1e-4, 0.04, CONTRADICTED),
])
def test_an_effect_is_small_when_its_interval_is_under_a_quarter_of_the_reference(low, high, verdict):
    assert small_verdict((low, high), REF) == verdict
    assert small_verdict(spread((low + high) / 2, low, high), REF) == verdict


def test_without_a_reference_or_with_one_within_the_noise_nothing_is_small():
    assert small_verdict((0.0, 0.001), None) == NOT_TESTED
    flat = ("expert count (S)", spread(0.004, 0.0, 0.009))
    assert small_verdict((0.0, 0.001), flat) == INCONCLUSIVE
    assert math.isnan(ratio_interval(0.0, 0.001, flat)[0])
    assert ratio_interval(0.011, 0.018, REF) == pytest.approx((0.1, 0.2))


def test_a_factor_spread_is_its_widest_group_with_intervals_simultaneous_over_groups():
    one = spread_of([(0.02, 5, 3)], 0.003, math.inf)
    assert one.low == pytest.approx(0.02 - studentized_range_quantile(0.95, 5) * 0.003 / math.sqrt(3))
    four = spread_of([(0.02, 5, 3), (0.01, 5, 3), (0.005, 2, 6), (0.0, 3, 3)], 0.003, math.inf)
    half = studentized_range_quantile(1 - 0.05 / 4, 5) * 0.003 / math.sqrt(3)  # Bonferroni over 4 groups
    assert (four.effect, four.low, four.high) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    assert (four.groups, four.settings, four.seeds) == (4, 5, 3)
    assert four.high > one.high and 0 <= four.p <= 1
    assert spread_of([(0.02, 5, 3)], None, math.inf) == Spread(0.02, 0.02, 0.02, 1, 5, 3, None)  # no seeds: points
    assert spread_of([], 0.003, math.inf) is None


def test_every_minor_factor_must_be_small_and_one_shown_large_contradicts():
    assert combine([REPRODUCED, REPRODUCED]) == REPRODUCED
    assert combine([REPRODUCED, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([INCONCLUSIVE, CONTRADICTED, REPRODUCED]) == CONTRADICTED
    assert combine([]) == INCONCLUSIVE

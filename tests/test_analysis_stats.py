"""analysis.stats: the studentized range (its quantiles against published tables, its false-alarm
rate whatever the number of settings), range intervals and the seed noise's degrees of freedom."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from analysis.findings.verdicts import spread_beyond_noise
from analysis.stats import (
    difference_se, range_interval, range_p_value, seed_noise, seed_noise_dof, studentized_range_cdf,
    studentized_range_quantile,
)

INF = math.inf


# Harter's tables of the studentized range (as reprinted in Montgomery's and Zar's appendices).
@pytest.mark.parametrize("p, k, dof, q", [
    (0.95, 3, INF, 3.314), (0.95, 10, INF, 4.474), (0.95, 2, 10, 3.151), (0.95, 2, INF, 2.772),
    (0.95, 5, 20, 4.232), (0.99, 3, INF, 4.120), (0.99, 10, 5, 10.24), (0.95, 2, 1, 17.97), (0.95, 20, 60, 5.241),
])
def test_studentized_range_quantiles_match_the_published_tables(p, k, dof, q):
    assert studentized_range_quantile(p, k, dof) == pytest.approx(q, abs=0.002)


@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_the_range_of_two_means_is_an_absolute_normal_difference(p):
    # k = 2, known noise: |Z1 - Z2| with Z1 - Z2 ~ N(0, 2), so q = sqrt(2) z_{(1 + p) / 2} exactly.
    assert studentized_range_quantile(p, 2) == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf((1 + p) / 2), abs=1e-4)


def test_studentized_range_quantile_inverts_the_cdf_and_grows_with_k_and_shrinks_with_dof():
    q = studentized_range_quantile(0.9, 7, 15)
    assert studentized_range_cdf(q, 7, 15) == pytest.approx(0.9, abs=1e-6)
    by_k = [studentized_range_quantile(0.95, k) for k in (2, 3, 5, 11, 20)]
    assert by_k == sorted(by_k) and by_k[-1] - by_k[0] > 2.2
    by_dof = [studentized_range_quantile(0.95, 4, d) for d in (2, 5, 30, INF)]
    assert by_dof == sorted(by_dof, reverse=True)


def test_studentized_range_agrees_with_scipy_where_it_is_installed():
    stats = pytest.importorskip("scipy.stats")
    for p, k, dof in [(0.95, 4, 8), (0.99, 11, 40), (0.9, 6, 3), (0.975, 16, 200)]:
        assert studentized_range_quantile(p, k, dof) == pytest.approx(stats.studentized_range.ppf(p, k, dof), abs=2e-3)


@pytest.mark.parametrize("call", [lambda: studentized_range_cdf(2.0, 1), lambda: studentized_range_quantile(1.0, 3)])
def test_studentized_range_refuses_what_it_cannot_answer(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("k", [2, 11])
def test_a_spread_beyond_noise_is_a_false_alarm_one_time_in_twenty_whatever_k(k):
    """Pure noise: k settings of 3 seeds each, the noise estimated from them (dof = 2k)."""
    rng = np.random.default_rng(7)
    draws = rng.normal(0, 0.003, size=(4000, k, 3))
    means, sd = draws.mean(axis=2), np.sqrt(draws.var(axis=2, ddof=1).mean(axis=1))
    spreads = means.max(axis=1) - means.min(axis=1)
    rate = np.mean([spread_beyond_noise(r, s, 3, k, 2 * k) for r, s in zip(spreads, sd)])
    assert rate == pytest.approx(0.05, abs=0.012)


def test_a_fixed_number_of_standard_errors_alarms_more_often_with_more_settings():
    # The rule this replaced: a range over 4 standard errors of one difference (4 sqrt(2) standard
    # errors of a mean). With known noise its false-alarm rate grows 50-fold from 2 to 11 settings.
    old = 4 * difference_se(1.0, 1)
    tail = {k: 1 - studentized_range_cdf(old, k) for k in (2, 11)}
    assert tail[2] == pytest.approx(2 * (1 - NormalDist().cdf(4)), rel=1e-3)  # |Z1 - Z2| > 4 sqrt(2)
    assert tail[11] > 40 * tail[2]


def test_range_interval_covers_the_true_range_and_its_p_value_matches_the_quantile():
    rng = np.random.default_rng(3)
    true = np.array([0.0, 0.002, 0.004, 0.01, 0.01])  # true range 0.01 over 5 settings of 4 seeds
    means = true + rng.normal(0, 0.003 / 2, size=(2000, 5))
    spreads = means.max(axis=1) - means.min(axis=1)
    covered = [lo <= 0.01 <= hi for lo, hi in (range_interval(r, 5, 4, 0.003) for r in spreads)]
    assert np.mean(covered) >= 0.95
    half = studentized_range_quantile(0.95, 5) * 0.003 / 2
    assert range_interval(0.02, 5, 4, 0.003) == pytest.approx((0.02 - half, 0.02 + half))
    assert range_interval(0.001, 5, 4, 0.003)[0] == 0.0  # a range is never negative
    assert range_interval(0.02, 5, 4, None) == (0.02, 0.02)  # no seeds: the point
    assert range_p_value(half, 5, 4, 0.003) == pytest.approx(0.05, abs=1e-4)
    assert range_p_value(0.02, 5, 4, None) is None


def test_seed_noise_degrees_of_freedom_count_repeats_of_each_setting():
    df = pd.DataFrame({"setting": ["a"] * 3 + ["b"] * 2 + ["c"], "seed": [0, 1, 2, 0, 1, 0],
                       "val_loss": [1.0, 1.2, 1.1, 2.0, 2.1, 3.0]})
    assert seed_noise_dof(df) == 3  # a: 2, b: 1, c: no repeat
    assert seed_noise(df) == pytest.approx(math.sqrt((0.02 + 0.005) / 3))
    assert seed_noise_dof(df[df["setting"] == "c"]) is None

"""Intervals and paired tests (resprune.stats): coverage on data with a known mean, agreement with
scipy.stats on the same data, and Holm's correction on a known set of p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from resprune.errors import InvalidInputError
from resprune.stats import holm, is_binary, mean_interval, paired_test, ratio_interval

TRIALS = 400


def test_bootstrap_intervals_cover_a_known_mean_95_percent_of_the_time():
    """Skewed per-example scores (exponential, mean 2) of 60 examples, 400 seeded trials."""
    covered = 0
    for trial in range(TRIALS):
        values = np.random.default_rng(trial).exponential(2.0, size=60)
        ci = mean_interval(values, seed=trial, resamples=1000)
        assert ci.method == "bca" and ci.low <= ci.estimate <= ci.high
        covered += ci.low <= 2.0 <= ci.high
    assert abs(covered / TRIALS - 0.95) <= 0.03, covered


def test_wilson_intervals_cover_a_known_accuracy_95_percent_of_the_time():
    covered = 0
    for trial in range(TRIALS):
        correct = (np.random.default_rng(trial).random(120) < 0.7).astype(float)
        ci = mean_interval(correct)
        assert ci.method == "wilson"
        covered += ci.low <= 0.7 <= ci.high
    assert abs(covered / TRIALS - 0.95) <= 0.03, covered


def test_wilson_is_scipys_and_a_constant_or_single_sample_has_no_width():
    correct = [1, 0, 1, 1, 0, 1, 1, 1]
    ci = mean_interval(correct)
    expected = stats.binomtest(6, 8).proportion_ci(0.95, method="wilson")
    assert (ci.low, ci.high) == pytest.approx((expected.low, expected.high))
    assert mean_interval([0.3] * 5) == mean_interval([0.3] * 5)
    assert (mean_interval([0.3] * 5).low, mean_interval([0.3] * 5).high) == (pytest.approx(0.3), pytest.approx(0.3))
    assert mean_interval([4.0]).method == "exact"
    assert mean_interval([0.2, 0.9, 0.4], seed=3) == mean_interval([0.2, 0.9, 0.4], seed=3)  # seeded


def test_ratio_interval_pairs_the_examples_and_covers_the_true_ratio():
    covered = 0
    for trial in range(TRIALS // 2):
        rng = np.random.default_rng(trial)
        reference = rng.exponential(1.0, size=80) + 1.0
        values = 0.8 * reference + rng.normal(0, 0.05, size=80)  # true ratio of means 0.8
        ci = ratio_interval(values, reference, seed=trial, resamples=1000)
        covered += ci.low <= 0.8 <= ci.high
    assert covered / (TRIALS // 2) >= 0.9
    assert ratio_interval([1, 2], [0, 0]).method == "undefined"
    with pytest.raises(InvalidInputError, match="same examples"):
        ratio_interval([1, 2, 3], [1, 2])


def test_ratio_interval_is_scipys_paired_bootstrap_and_rel_averages_the_metrics_ratios():
    rng = np.random.default_rng(7)
    ref = rng.exponential(1.0, size=(60, 2)) + 1.0
    val = ref * [0.8, 1.0] + rng.normal(0, 0.05, size=(60, 2))
    one = ratio_interval(val[:, 0], ref[:, 0], seed=3, resamples=500)
    want = stats.bootstrap((val[:, 0], ref[:, 0]), lambda x, y, axis: x.mean(axis) / y.mean(axis), paired=True,
                           vectorized=True, n_resamples=500, method="BCa", rng=np.random.default_rng(3))
    assert (one.low, one.high) == pytest.approx((want.confidence_interval.low, want.confidence_interval.high))
    rel = ratio_interval(val, ref, seed=3, resamples=500)  # two metrics: Rel. is the mean of their ratios
    both = stats.bootstrap((val[:, 0], val[:, 1], ref[:, 0], ref[:, 1]),
                           lambda a, b, c, d, axis: (a.mean(axis) / c.mean(axis) + b.mean(axis) / d.mean(axis)) / 2,
                           paired=True, vectorized=True, n_resamples=500, method="BCa", rng=np.random.default_rng(3))
    assert rel.estimate == pytest.approx(np.mean(val.mean(0) / ref.mean(0)))
    assert (rel.low, rel.high) == pytest.approx((both.confidence_interval.low, both.confidence_interval.high))
    assert rel.low < 0.9 < rel.high
    assert ratio_interval([[1, 2], [2, 2]], [[1, 0], [1, 0]]).method == "undefined"  # one metric's reference is 0


def test_paired_tests_are_scipys_on_the_same_data():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 1, 40), rng.normal(0.0, 1, 40)
    assert paired_test(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue)
    x = (rng.random(200) < 0.7).astype(float)
    y = (rng.random(200) < 0.6).astype(float)
    only_x, only_y = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    assert paired_test(x, y) == pytest.approx(stats.binomtest(only_x, only_x + only_y, 0.5).pvalue)  # McNemar
    assert paired_test(x, x) == 1.0 and paired_test(a, a) == 1.0
    assert is_binary(x) and not is_binary(a)


def test_holm_on_a_known_set_of_p_values():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005})
    assert adjusted == pytest.approx({"d": 0.02, "a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})
    assert holm({}) == {}


def test_values_that_are_not_numbers_are_named():
    with pytest.raises(InvalidInputError, match="1 of 3 values are not finite"):
        mean_interval([1.0, math.nan, 2.0])
    with pytest.raises(InvalidInputError, match="no values"):
        mean_interval([])

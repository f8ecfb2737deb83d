"""Intervals and paired tests for per-example results: what a reviewer asks of "A beats B".

Built on ``scipy.stats``, nothing hand-rolled where SciPy has it:

- ``mean_interval``: the mean of per-example values with a 95 % interval: Wilson's score
  interval when every value is 0 or 1 (an accuracy), else a seeded bootstrap over the examples
  (BCa; the percentile interval where BCa is undefined, e.g. a constant sample);
- ``ratio_interval``: ``mean(values) / mean(reference)`` over the same examples, or the mean of
  such ratios over several metrics (the paper's Rel.), with a paired, seeded bootstrap interval;
- ``paired_test``: the p-value of a method against a reference on the same examples: McNemar's
  exact test (a binomial test on the discordant pairs) when both are 0/1 per example, else the
  Wilcoxon signed-rank test;
- ``holm``: Holm's step-down correction of the p-values of the methods of one table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError

__all__ = ["Interval", "mean_interval", "ratio_interval", "paired_test", "holm", "is_binary"]

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """An estimate and its interval: ``low <= estimate <= high`` (NaN where undefined), and how
    the interval was made (``wilson``, ``bca``, ``percentile``, ``exact`` for a single value)."""

    estimate: float
    low: float
    high: float
    method: str


def _values(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise InvalidInputError(f"{what}: no values (an interval needs at least one example).")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{what}: {int((~np.isfinite(array)).sum())} of {array.size} values are not finite "
                                f"numbers; drop those examples (and say so) before asking for an interval.")
    return array


def is_binary(values: Sequence[float]) -> bool:
    """Whether every value is 0 or 1 (per-example correctness)."""
    array = np.asarray(values, dtype=np.float64)
    return bool(array.size) and bool(np.isin(array, (0.0, 1.0)).all())


def mean_interval(values: Sequence[float], *, confidence: float = CONFIDENCE, seed: int = 0,
                  resamples: int = RESAMPLES, proportion: bool = True) -> Interval:
    """The mean of ``values`` with a ``confidence`` interval (see the module docstring).

    ``proportion=False``: 0/1 values are plain numbers (a FLOPs ratio of 1 on every example), not
    successes, so they get no Wilson interval."""
    from scipy import stats

    array = _values(values, "mean_interval")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, mean, mean, "exact")
    if proportion and is_binary(array):
        ci = stats.binomtest(int(array.sum()), int(array.size)).proportion_ci(confidence, method="wilson")
        return Interval(mean, float(ci.low), float(ci.high), "wilson")
    if float(array.min()) == float(array.max()):
        return Interval(mean, mean, mean, "percentile")
    return _bootstrap((array,), lambda x, axis: np.mean(x, axis=axis), mean, confidence, seed, resamples)


def ratio_interval(values: Sequence[float] | Sequence[Sequence[float]],
                   reference: Sequence[float] | Sequence[Sequence[float]], *, confidence: float = CONFIDENCE,
                   seed: int = 0, resamples: int = RESAMPLES) -> Interval:
    """``mean(values) / mean(reference)`` over the same examples with a paired bootstrap interval
    (the examples are resampled together); NaN when a reference mean is 0.

    Rows of 2-D ``values`` and ``reference`` (``[examples, metrics]``) are examples, columns
    metrics: the estimate is the mean over the metrics of their ratios of means, the paper's
    Rel., and one resample of the examples moves every metric at once."""
    a = _matrix(values, "ratio_interval")
    b = _matrix(reference, "ratio_interval (reference)")
    if a.shape != b.shape:
        raise InvalidInputError(f"ratio_interval: values of shape {a.shape} against reference values of shape "
                                f"{b.shape}; a ratio of means pairs the same examples (and metrics).")
    if bool((b.mean(axis=0) == 0.0).any()):
        return Interval(math.nan, math.nan, math.nan, "undefined")
    ratio = float(np.mean(a.mean(axis=0) / b.mean(axis=0)))
    n = a.shape[0]
    if n == 1 or (bool((a.min(0) == a.max(0)).all()) and bool((b.min(0) == b.max(0)).all())):
        return Interval(ratio, ratio, ratio, "exact" if n == 1 else "percentile")

    def statistic(index: np.ndarray, axis: int) -> np.ndarray:
        picked = np.moveaxis(index, axis, -1).astype(np.intp)  # [..., n] resampled example indices
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.mean(a[picked].mean(axis=-2) / b[picked].mean(axis=-2), axis=-1)

    return _bootstrap((np.arange(n, dtype=np.float64),), statistic, ratio, confidence, seed, resamples)


def _matrix(values: Sequence[float] | Sequence[Sequence[float]], what: str) -> np.ndarray:
    """``values`` as ``[examples, metrics]`` (a 1-D sequence: one metric), finite."""
    array = np.asarray(values, dtype=np.float64)
    flat = _values(array.reshape(-1), what)
    return flat.reshape(array.shape if array.ndim == 2 else (-1, 1))


def _bootstrap(data: tuple[np.ndarray, ...], statistic, estimate: float, confidence: float, seed: int,
               resamples: int) -> Interval:
    """SciPy's bootstrap, BCa first; the percentile interval where BCa is undefined."""
    import warnings

    from scipy import stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a degenerate BCa warns and returns NaN: fall back below
            result = stats.bootstrap(data, statistic, vectorized=True, confidence_level=confidence,
                                     n_resamples=resamples, method=method, rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return Interval(estimate, min(low, estimate), max(high, estimate), method.lower())
    return Interval(estimate, math.nan, math.nan, "undefined")


def paired_test(values: Sequence[float], reference: Sequence[float]) -> float:
    """Two-sided p-value of ``values`` against ``reference`` on the same examples: McNemar's exact
    test when both are 0/1 per example, else the Wilcoxon signed-rank test; 1.0 when they never
    differ."""
    from scipy import stats

    a = _values(values, "paired_test")
    b = _values(reference, "paired_test (reference)")
    if a.shape != b.shape:
        raise InvalidInputError(f"paired_test: {a.size} values against {b.size} reference values; a paired test "
                                f"compares the same examples.")
    if not bool((a != b).any()):
        return 1.0
    if is_binary(a) and is_binary(b):
        only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return float(stats.wilcoxon(a, b).pvalue)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family: the methods of one table): the ``i``-th smallest
    of ``m`` is multiplied by ``m - i`` (from 0), kept monotone and capped at 1."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    out: dict[str, float] = {}
    running = 0.0
    for i, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * float(pvalues[key])))
        out[key] = running
    return out

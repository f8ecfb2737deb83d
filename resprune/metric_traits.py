"""How a metric key reads in a table: whether smaller is better, whether it is a share shown in %.

Metrics declare both (``Metric.lower_is_better``, ``Metric.percent``); a key whose metric is not
installed where the table is made reads as a higher-is-better plain number.
"""

from __future__ import annotations

__all__ = ["lower_is_better", "is_percent", "counts_successes"]


def _declared(name: str, attr: str) -> bool:
    """Whether metric key ``name`` (``fidelity.kl``) is in its metric's ``attr`` set; metrics
    not installed where the report is written read as higher-is-better plain numbers."""
    from .plugins import get_host

    metric, _, key = name.partition(".")
    registry = get_host().metrics
    return metric in registry and key in getattr(registry.get(metric), attr)


def lower_is_better(name: str) -> bool:
    """Whether smaller values of metric key ``name`` are better (the metric declares it)."""
    return _declared(name, "lower_is_better")


def is_percent(name: str) -> bool:
    """Whether metric key ``name`` is a share shown as a percentage (the metric declares it)."""
    return _declared(name, "percent")


def counts_successes(name: str) -> bool:
    """Whether 0/1 values of metric key ``name`` count successes (Wilson's interval fits them): a
    share its metric declares, or a key of no installed metric (lmms-eval's per-sample
    correctness); a declared plain number (a FLOPs ratio of 1) does not."""
    from .plugins import get_host

    return is_percent(name) or name.partition(".")[0] not in get_host().metrics

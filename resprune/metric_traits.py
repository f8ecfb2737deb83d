"""How a metric key reads in a table: whether smaller is better, whether it is a share shown in %.

Metrics declare both (``Metric.lower_is_better``, ``Metric.percent``); a key whose metric is not
installed where the table is made reads as a higher-is-better plain number.
"""

from __future__ import annotations

__all__ = ["lower_is_better", "is_percent"]


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

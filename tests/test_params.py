"""Strategy params: validation, and the cache that keeps it off the selection hot path."""

from __future__ import annotations

import pytest

import resprune
from resprune.plugins import get_host


def test_params_are_validated_every_time_and_instances_do_not_share_state():
    cls = get_host().selectors.get("residual_energy")
    a = cls({"alpha": 0.5})
    a.params.alpha = 9.0  # mutating one instance's params must not leak into the cache
    b = cls({"alpha": 0.5})
    assert b.params.alpha == 0.5 and b.params is not a.params
    for _ in range(2):  # a cached success must not hide a later error, nor an error a success
        with pytest.raises(resprune.ConfigError, match="alpha"):
            cls({"alpha": -1.0})
    assert cls({"alpha": 1}).params.alpha == 1.0


def test_int_and_bool_values_are_not_confused_by_the_cache():
    cls = get_host().selectors.get("random")
    assert cls({"seed": 1}).params.seed == 1
    with pytest.raises(resprune.ConfigError, match="seed"):
        cls({"seed": "one"})

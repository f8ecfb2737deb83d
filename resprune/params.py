"""Validation of a strategy's ``params`` against its ``Params`` dataclass (OmegaConf)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, suggest

__all__ = ["build_params", "param_names", "check_choice", "check_range"]


def param_names(params_cls: type) -> list[str]:
    """Field names of a ``Params`` dataclass."""
    return [f.name for f in dataclasses.fields(params_cls)]


def build_params(owner: type, values: Mapping[str, Any] | DictConfig | None, *, where: str = "params") -> Any:
    """Merge ``values`` into ``owner.Params`` and return the validated dataclass instance.

    Unknown keys, wrong types and values the dataclass rejects raise ``ConfigError``
    naming ``where`` (e.g. ``"selector.params"`` in ``llava.yaml``), the strategy and the
    valid keys.
    """
    params_cls = owner.Params
    label = f"{getattr(owner, 'kind', 'strategy')} '{getattr(owner, 'name', owner.__name__)}'"
    values = {} if values is None else values
    if isinstance(values, params_cls):
        return values
    if not isinstance(values, (Mapping, DictConfig)):
        raise ConfigError(f"{where}: params of {label} must be a mapping, got {type(values).__name__}.")
    valid = param_names(params_cls)
    for key in values:
        if key not in valid:
            raise ConfigError(
                f"{where}.{key}: unknown parameter of {label}.{suggest(key, valid)} "
                f"Valid parameters: {', '.join(valid) or '(none)'}."
            )
    cache_key = _cache_key(params_cls, values)
    if cache_key is not None and cache_key in _validated:
        return dataclasses.replace(_validated[cache_key])  # a fresh copy: Params are mutable
    try:
        schema = OmegaConf.structured(params_cls)
        merged = OmegaConf.merge(schema, values)
        built = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = getattr(exc, "msg", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {msg} ({label}).".replace(". (", " (")) from None
    except (ValueError, TypeError) as exc:  # raised by Params.__post_init__
        raise ConfigError(f"{where}: {exc} ({label}).") from None
    for f in dataclasses.fields(built):
        bad = _non_finite(getattr(built, f.name))
        if bad is not None:
            raise ConfigError(f"{where}.{f.name}: must be a finite number, got {bad} ({label}).")
    if cache_key is not None and len(_validated) < _CACHE_SIZE:
        _validated[cache_key] = dataclasses.replace(built)
    return built


_CACHE_SIZE = 4096
_validated: dict[tuple, Any] = {}
"""Params already validated, keyed by class and values: OmegaConf costs ~0.7 ms per build,
more than a small selection, and ablations build the same params thousands of times."""


def _cache_key(params_cls: type, values: Mapping[str, Any] | DictConfig) -> tuple | None:
    if isinstance(values, DictConfig):
        return None
    items = tuple(sorted((str(k), type(v).__name__, v) for k, v in values.items()))
    try:
        hash(items)
    except TypeError:
        return None
    return (params_cls, items)


def _non_finite(value: Any) -> float | None:
    """The first NaN or infinite float in ``value`` (nested lists and mappings included), if any."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            bad = _non_finite(item)
            if bad is not None:
                return bad
    return None


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` if ``value`` is not one of ``choices`` (for ``__post_init__``)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}.{suggest(value, choices)}")


def check_range(field: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{field}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise ValueError(f"{field}={value!r} must be <= {high}")

"""The exceptions resprune raises.

Every error names what was wrong, where (plugin, config key, tensor shape) and, where
there is one, how to fix it. All derive from ``ResPruneError``; the ones about
values also derive from ``ValueError``, the lookup ones from ``KeyError``, so
callers can catch them either way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ResPruneError",
    "ConfigError",
    "UnknownStrategyError",
    "PluginError",
    "PluginLoadError",
    "DuplicateStrategyError",
    "PluginContractError",
    "BudgetError",
    "InvalidInputError",
    "MissingContextError",
    "IncompatibleBackboneError",
    "MissingDependencyError",
    "OutputPathError",
    "suggest",
]


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(name), sorted(set(choices)), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class ResPruneError(Exception):
    """Base class of every error resprune raises on purpose."""


class ConfigError(ResPruneError, ValueError):
    """A pipeline configuration is invalid (unknown key, wrong type, missing value...)."""


class UnknownStrategyError(ResPruneError, KeyError):
    """A scorer, selector or injector name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(ResPruneError):
    """A plugin is broken: it could not be loaded or it registered something invalid."""


class PluginLoadError(PluginError):
    """An entry-point plugin failed to import (raised when RESPRUNE_STRICT_PLUGINS=1)."""


class DuplicateStrategyError(PluginError):
    """Two plugins registered the same strategy name."""


class PluginContractError(PluginError):
    """A plugin's strategy returned output that breaks its interface (shape, dtype...)."""


class BudgetError(ConfigError):
    """A token budget that is neither a positive int nor a ratio in (0, 1]."""


class InvalidInputError(ResPruneError, ValueError):
    """Tokens or scores with the wrong shape, dtype, or non-finite values."""


class MissingContextError(ResPruneError, KeyError):
    """A strategy needs context (text, CLS attention, grid...) that was not supplied."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IncompatibleBackboneError(ResPruneError):
    """A model type no injector supports, or a strategy the backbone cannot feed."""


class MissingDependencyError(ResPruneError, ImportError):
    """An optional package needed by the chosen option is not installed."""


class OutputPathError(ResPruneError):
    """An output path resprune cannot write (a file where a folder belongs, a read-only folder...),
    found before any model work."""

"""Hook specifications: the ways a plugin adds strategies to resprune.

Each hook hands the plugin a ``register`` callback. A plugin calls it once per class it
provides::

    import resprune

    @resprune.hookimpl
    def resprune_register_selectors(register):
        register(MySelector)                      # MySelector.name is its registry name
        register(MyOtherSelector, aliases=("mos",))

``register(cls, *, aliases=(), override=False)`` stores ``cls`` under ``cls.name`` (and
the aliases). Registering a name another plugin already took is an error naming both
plugins, unless ``override=True`` is passed deliberately.

Pipelines pick strategies by name from the registries these hooks fill, never by hook
call order. Hook implementations must not give their arguments default values: pluggy
does not pass arguments that have defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._markers import hookspec

RegisterFn = Callable[..., Any]


# --- strategies -----------------------------------------------------------------------


@hookspec
def resprune_register_scorers(register: RegisterFn) -> None:
    """Register ``Scorer`` subclasses.

    A scorer turns a ``PruneContext`` into one named score per
    visual token (``[B, N]``), e.g. text relevance or CLS attention.

    Args:
        register: ``register(cls, *, aliases=(), override=False)``.

    Added in 0.1.
    """


@hookspec
def resprune_register_selectors(register: RegisterFn) -> None:
    """Register ``Selector`` subclasses.

    A selector picks ``k`` distinct token indices from the tokens and the named scores.

    Args:
        register: ``register(cls, *, aliases=(), override=False)``.

    Added in 0.1.
    """


@hookspec
def resprune_register_mergers(register: RegisterFn) -> None:
    """Register ``Merger`` subclasses.

    A merger turns the tokens a stage's selector dropped into tokens within the same
    budget (VisionZip's contextual tokens, PruMerge-style averaging into kept tokens).

    Args:
        register: ``register(cls, *, aliases=(), override=False)``.

    Added in 0.2.
    """


# --- backbones ------------------------------------------------------------------------


@hookspec
def resprune_register_injectors(register: RegisterFn) -> None:
    """Register ``Injector`` subclasses.

    An injector attaches a pipeline to a model of the ``config.model_type`` values it
    declares in ``model_types``.

    Args:
        register: ``register(cls, *, aliases=(), override=False)``.

    Added in 0.1.
    """


# --- evaluation -----------------------------------------------------------------------


@hookspec
def resprune_register_metrics(register: RegisterFn) -> None:
    """Register ``Metric`` subclasses.

    A metric turns one example's outcome under one ablation cell (the selection, the
    pruned and unpruned outputs, costs) into named numbers, averaged over the examples.

    Args:
        register: ``register(cls, *, aliases=(), override=False)``.

    Added in 0.1.
    """

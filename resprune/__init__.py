"""resprune: training-free visual token pruning for large vision-language models.

Quick use::

    import resprune
    keep = resprune.select(tokens, 64)                                # ResPrune, geometric
    keep = resprune.select(tokens, 64, scores={"relevance": r}, alpha=0.75)
    pipe = resprune.load_pipeline("resprune-llava15", budget=128)      # shipped YAML config
    pipe = resprune.load_pipeline("fastv", budget=64)                  # pruning inside the LLM
"""

from ._markers import hookimpl
from .ablation import Ablation, AblationError, ResultTable
from .budget import check_budget, resolve_budget
from .config import PipelineConfig, load_config, shipped_configs
from .context import PruneContext
from .errors import (
    BudgetError,
    ConfigError,
    DuplicateStrategyError,
    IncompatibleBackboneError,
    InvalidInputError,
    MissingContextError,
    MissingDependencyError,
    OutputPathError,
    PluginContractError,
    PluginError,
    PluginLoadError,
    ResPruneError,
    UnknownStrategyError,
)
from .interfaces import Injector, Merger, Scorer, Selector
from .pipeline import Pipeline, load_pipeline
from .stages import Stage
from .plugins import get_host, list_plugins, reset_plugins
from .selection import Selection, score, select

from ._version import __version__

__all__ = [
    "hookimpl",
    "Ablation",
    "AblationError",
    "ResultTable",
    "select",
    "score",
    "Selection",
    "Pipeline",
    "Stage",
    "load_pipeline",
    "load_config",
    "shipped_configs",
    "PipelineConfig",
    "PruneContext",
    "Scorer",
    "Selector",
    "Merger",
    "Injector",
    "list_plugins",
    "get_host",
    "reset_plugins",
    "check_budget",
    "resolve_budget",
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
    "MissingDependencyError",
    "OutputPathError",
    "IncompatibleBackboneError",
]

"""Plugin loading: built-in strategies first, then the ``resprune`` entry-point group.

Environment variables:

- ``RESPRUNE_DISABLE_PLUGIN_AUTOLOAD=1``: load the built-in plugins only.
- ``RESPRUNE_DISABLE_PLUGINS=a,b``: skip the entry-point plugins named ``a`` and ``b``.
- ``RESPRUNE_STRICT_PLUGINS=1``: a plugin that fails to load is an error, not a warning.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import inspect
import os
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from ._markers import PROJECT_NAME
from .errors import DuplicateStrategyError, IncompatibleBackboneError, PluginError, PluginLoadError
from .interfaces import Injector, Merger, Scorer, Selector
from .metrics import NEEDS, Metric
from .registry import Registry

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "KINDS",
    "PluginKind",
    "PluginHost",
    "FailedPlugin",
    "get_host",
    "reset_plugins",
    "list_plugins",
]

ENTRY_POINT_GROUP = "resprune"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "resprune.strategies.residual_energy",
    "resprune.strategies.dpp",
    "resprune.strategies.divprune",
    "resprune.strategies.topk",
    "resprune.strategies.random_choice",
    "resprune.strategies.uniform",
    "resprune.strategies.text_relevance",
    "resprune.strategies.token_scores",
    "resprune.strategies.cls_attention",
    "resprune.strategies.llm_scores",
    "resprune.strategies.dart",
    "resprune.strategies.vispruner",
    "resprune.strategies.scope",
    "resprune.strategies.hired",
    "resprune.strategies.temporal",
    "resprune.strategies.dycoke",
    "resprune.strategies.fastvid",
    "resprune.strategies.tome",
    "resprune.strategies.sparsevlm",
    "resprune.strategies.clip_relevance",
    "resprune.strategies.cdpruner",
    "resprune.strategies.prumerge",
    "resprune.strategies.mergers",
    "resprune.strategies.pool",
    "resprune.strategies.downsample",
    "resprune.backbones.llava",
    "resprune.backbones.qwen2_5_vl",
    "resprune.backbones.qwen3_vl",
    "resprune.backbones.qwen3_5",
    "resprune.backbones.internvl",
    "resprune.backbones.llava_onevision",
    "resprune.backbones.gemma3",
    "resprune.strategies.metrics",
)
"""Modules registered as plugins before any entry point, under their module names."""

@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin class: its name, the host attribute holding its registry, and its hook."""

    name: str
    """Singular, as in messages: ``selector``."""
    registry: str
    """The ``PluginHost`` attribute (and ``list_plugins`` key): ``selectors``."""
    hook: str
    """The registration hook: ``resprune_register_selectors``."""
    base: type
    """The class every registered one subclasses."""


KINDS: tuple[PluginKind, ...] = (
    PluginKind("scorer", "scorers", "resprune_register_scorers", Scorer),
    PluginKind("selector", "selectors", "resprune_register_selectors", Selector),
    PluginKind("merger", "mergers", "resprune_register_mergers", Merger),
    PluginKind("injector", "injectors", "resprune_register_injectors", Injector),
    PluginKind("metric", "metrics", "resprune_register_metrics", Metric),
)
"""Every kind of plugin class, in the order listings show them."""

_HOOKS = {kind.registry: kind.hook for kind in KINDS}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass
class FailedPlugin:
    """An entry-point plugin that could not be loaded."""

    name: str
    distribution: str | None
    error: BaseException


@dataclass
class _PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    provides: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in _HOOKS})


class PluginHost:
    """A plugin manager plus the registries its registration hooks fill.

    Args:
        autoload: also load the ``resprune`` entry-point group (default: unless
            ``RESPRUNE_DISABLE_PLUGIN_AUTOLOAD`` is set).
        strict: raise on a plugin that fails to load (default: ``RESPRUNE_STRICT_PLUGINS``).
        builtins: dotted module names registered first.
        plugins: extra plugin objects (modules, classes, instances) registered after the
            entry points, e.g. by tests.
    """

    def __init__(
        self,
        *,
        autoload: bool | None = None,
        strict: bool | None = None,
        builtins: Iterable[str] = BUILTIN_PLUGINS,
        plugins: Iterable[Any] = (),
    ) -> None:
        self.autoload = (not _flag("RESPRUNE_DISABLE_PLUGIN_AUTOLOAD")) if autoload is None else autoload
        self.strict = _flag("RESPRUNE_STRICT_PLUGINS") if strict is None else strict
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        required = {"scorer": {"output": "the name of the score it writes"}}
        for kind in KINDS:
            setattr(self, kind.registry, Registry(kind.name, kind.base, required=required.get(kind.name),
                                                  hint=reinstall_hint))
        self.scorers: Registry[type[Scorer]]
        self.selectors: Registry[type[Selector]]
        self.mergers: Registry[type[Merger]]
        self.injectors: Registry[type[Injector]]
        self.metrics: Registry[type[Metric]]
        self.failed: list[FailedPlugin] = []
        self._info: dict[str, _PluginInfo] = {}
        own_version = _version("resprune")
        for module_name in builtins:
            self._register(importlib.import_module(module_name), module_name, "resprune", own_version)
        if self.autoload:
            self._load_entry_points()
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin)}"
            self._register(plugin, name, None, getattr(plugin, "__version__", None))  # a module's own version
        self._check_pending()
        self._fill_registries()

    # --- loading ----------------------------------------------------------------------

    def _register(self, plugin: Any, name: str, dist: str | None, version: str | None) -> None:
        if self.pm.is_registered(plugin) or self.pm.has_plugin(name):
            return
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(_explain_validation(name, plugin, exc)) from None
        self._info[name] = _PluginInfo(name, dist, version)

    def _load_entry_points(self) -> None:
        blocked = {n.strip() for n in os.environ.get("RESPRUNE_DISABLE_PLUGINS", "").split(",") if n.strip()}
        seen: set[str] = set()
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen or ep.name in blocked:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            try:
                plugin = ep.load()
                self._register(plugin, ep.name, dist_name, dist.version if dist is not None else None)
            except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop the others
                self._fail(ep.name, dist_name, exc)

    def _fail(self, name: str, dist: str | None, exc: BaseException) -> None:
        where = f"plugin '{name}'" + (f" (distribution '{dist}')" if dist else "")
        message = f"resprune: {where} failed to load and is skipped: {type(exc).__name__}: {exc}"
        if self.strict:
            raise PluginLoadError(message + " [RESPRUNE_STRICT_PLUGINS=1]") from exc
        self.failed.append(FailedPlugin(name, dist, exc))
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._info.pop(name, None)

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) if exc.plugin is not None else None
            raise PluginError(
                f"plugin '{name or exc.plugin}' "
                f"implements an unknown hook: {exc}. The hooks are: {', '.join(_HOOKS.values())} "
                f"(check the spelling)."
            ) from None

    def _fill_registries(self) -> None:
        """Call every plugin's hooks, then commit what each registered, plugin by plugin.

        A third-party plugin whose hook raises is skipped as a whole (none of what its
        other hooks registered is kept); a built-in one raises.
        """
        staged: dict[str, list[tuple[str, Any, tuple[str, ...], bool]]] = {}
        failed: set[str] = set()
        for kind, hook_name in _HOOKS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                name = impl.plugin_name
                if name in failed:
                    continue
                calls: list[tuple[str, Any, tuple[str, ...], bool]] = []

                def register(cls: Any, *, aliases: Iterable[str] = (), override: bool = False,
                             _calls: list[tuple[str, Any, tuple[str, ...], bool]] = calls,
                             _kind: str = kind) -> None:
                    _calls.append((_kind, cls, tuple(aliases), override))

                try:
                    if "register" not in impl.argnames:  # a default hides it from pluggy: no call would register
                        raise PluginError(
                            f"plugin '{name}': {hook_name} must take a parameter named `register` without a "
                            f"default value (pluggy passes nothing to parameters that have defaults); "
                            f"write `def {hook_name}(register):`.")
                    impl.function(**{a: register for a in impl.argnames})
                except Exception as exc:  # noqa: BLE001 - one broken plugin must not stop the others
                    info = self._info.get(name)
                    if info is None or info.distribution == "resprune":
                        raise
                    failed.add(name)
                    staged.pop(name, None)
                    self._fail(name, info.distribution, exc)
                    continue
                staged.setdefault(name, []).extend(calls)
        for name, calls in staged.items():
            info = self._info.get(name)
            for kind, cls, aliases, override in calls:
                registry: Registry[Any] = getattr(self, kind)
                registry.register(cls, plugin=name, aliases=aliases, override=override)
                if info is not None and cls.name not in info.provides[kind]:
                    info.provides[kind].append(cls.name)
        self._model_types = self._claim_model_types()
        for entry in self.metrics.entries():
            unknown = sorted(set(entry.cls.needs) - set(NEEDS))
            if unknown:
                raise PluginError(f"plugin '{entry.plugin}': metric '{entry.name}' needs {unknown}, which the runner "
                                  f"does not know; it computes: {', '.join(f'{k} ({v})' for k, v in NEEDS.items())}.")

    def _claim_model_types(self) -> dict[str, Any]:
        """``model_type`` -> the injector entry that handles it; two claims are an error."""
        owners: dict[str, Any] = {}
        for entry in self.injectors.entries():
            for model_type in entry.cls.model_types:
                old = owners.get(model_type)
                if old is not None:
                    raise DuplicateStrategyError(
                        f"model_type '{model_type}' is claimed by two injectors: '{old.name}' (plugin '{old.plugin}') "
                        f"and '{entry.name}' (plugin '{entry.plugin}'). Disable one (RESPRUNE_DISABLE_PLUGINS), or "
                        f"register the new injector under the old one's name with override=True.")
                owners[model_type] = entry
        return owners

    def injector_for(self, model_type: Any, *, model: Any = None) -> type[Injector]:
        """The injector class registered for ``model_type`` (``model``, if given, names the
        model in the error); ``IncompatibleBackboneError`` lists the supported types."""
        entry = self._model_types.get(model_type)
        if entry is None:
            what = f" ({type(model).__name__})" if model is not None else ""
            supported = ", ".join(f"{mt} ({e.name})" for mt, e in sorted(self._model_types.items())) or "none"
            raise IncompatibleBackboneError(
                f"no injector supports model_type '{model_type}'{what}. Supported: {supported}. Third-party "
                f"backbones register one through the resprune_register_injectors hook.")
        return entry.cls

    def injector_entry(self, model_type: Any) -> Any:
        """The registry ``Entry`` (class and providing plugin) of ``model_type``'s injector, or ``None``."""
        return self._model_types.get(model_type)

    @property
    def model_types(self) -> list[str]:
        """Every ``model_type`` some registered injector handles."""
        return sorted(self._model_types)

    # --- queries ----------------------------------------------------------------------

    def registry(self, kind: str) -> Registry[Any]:
        """The registry of a kind by its singular name (``"selector"``)."""
        for k in KINDS:
            if k.name == kind:
                return getattr(self, k.registry)
        raise KeyError(f"no plugin kind '{kind}'; kinds: {', '.join(k.name for k in KINDS)}")

    def list_plugins(self) -> list[dict[str, Any]]:
        """Every loaded plugin with its distribution, version and the names it registered."""
        rows = []
        for info in self._info.values():
            aliases = {alias: name for kind in _HOOKS for alias, name in getattr(self, kind).aliases().items()
                       if getattr(self, kind).entry(alias).plugin == info.name}
            rows.append({
                "plugin": info.name,
                "distribution": info.distribution,
                "version": info.version,
                **{kind: sorted(names) for kind, names in info.provides.items()},
                "aliases": dict(sorted(aliases.items())),
            })
        return rows


def _explain_validation(name: str, plugin: Any, exc: pluggy.PluginValidationError) -> str:
    """resprune's words for a hook implementation pluggy refused (usually a misspelt parameter)."""
    for hook in _HOOKS.values():
        impl = getattr(plugin, hook, None)
        if impl is None:
            continue
        try:
            params = list(inspect.signature(impl).parameters)
        except (TypeError, ValueError):
            continue
        if params != ["register"]:
            return (f"plugin '{name}': {hook}({', '.join(params)}) does not match the hook's signature "
                    f"{hook}(register): hook implementations take exactly one parameter, named `register`.")
    return f"plugin '{name}' does not match resprune's hook specifications: {exc}"


def stale_entry_points() -> list[str]:
    """``resprune`` entry points that an editable install's ``pyproject.toml`` declares but its
    installed metadata lacks or spells differently (added or renamed without reinstalling)."""
    import json
    import tomllib
    from urllib.parse import unquote, urlparse

    found = []
    for dist in metadata.distributions():
        try:
            info = json.loads(dist.read_text("direct_url.json") or "{}")
            if not info.get("dir_info", {}).get("editable") or not info.get("url", "").startswith("file:"):
                continue
            root = Path(unquote(urlparse(info["url"]).path))
            declared = tomllib.loads((root / "pyproject.toml").read_text()).get("project", {}).get(
                "entry-points", {}).get(ENTRY_POINT_GROUP, {})
        except (OSError, ValueError, tomllib.TOMLDecodeError, AttributeError):
            continue
        installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP}
        for ep_name, value in declared.items():
            if installed.get(ep_name) != value:
                found.append(f"{dist.metadata['Name']} declares `{ep_name} = \"{value}\"` in {root / 'pyproject.toml'} "
                             f"but its installed metadata {'has ' + repr(installed[ep_name]) if ep_name in installed else 'does not'}: "
                             f"reinstall it (pip install -e {root})")
    return found


def reinstall_hint() -> str:
    """What to say after 'unknown strategy' when nothing is close: stale entry points, or where names come from."""
    stale = stale_entry_points()
    if stale:
        return "Entry points changed since install: " + "; ".join(stale) + "."
    return ("Plugins' names appear once their package is installed (`resprune plugins` lists what is loaded); "
            "did you reinstall the package after changing its entry points?")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_host: PluginHost | None = None
_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide plugin host, loaded on first use."""
    global _host
    if _host is None:
        with _lock:
            if _host is None:
                _host = PluginHost()
    return _host


def reset_plugins(host: PluginHost | None = None) -> PluginHost | None:
    """Replace the process-wide host (``None``: reload lazily on next use). Returns the old one."""
    global _host
    with _lock:
        old, _host = _host, host
    return old


def list_plugins() -> list[dict[str, Any]]:
    """Every loaded plugin and the scorers, selectors, mergers, injectors and metrics it provides."""
    return get_host().list_plugins()

"""Typed name -> class registries filled by the registration hooks."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import DuplicateStrategyError, PluginError, UnknownStrategyError, suggest

T = TypeVar("T", bound=type)
log = logging.getLogger("resprune")

__all__ = ["Registry", "Entry"]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered class and the plugin that provided it."""

    name: str
    cls: T
    plugin: str
    alias_of: str | None = None


class Registry(Generic[T]):
    """Holds the classes of one kind (scorers, selectors or injectors) by name.

    Args:
        kind: human name used in messages, e.g. ``"selector"``.
        base: every registered class must subclass it.
    """

    def __init__(self, kind: str, base: T, *, required: Mapping[str, str] | None = None,
                 hint: Callable[[], str] | None = None) -> None:
        self.kind = kind
        self.base = base
        self.required = dict(required or {})
        """Class attributes (besides ``name``) every registered class must set, with what they mean."""
        self.hint = hint
        """Called when a name is unknown and nothing close exists; returns a sentence (or "")."""
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        cls: T,
        *,
        plugin: str,
        aliases: tuple[str, ...] | list[str] = (),
        override: bool = False,
    ) -> None:
        """Store ``cls`` under ``cls.name`` and its aliases, on behalf of ``plugin``."""
        if not isinstance(cls, type):
            raise PluginError(
                f"plugin '{plugin}' registered {cls!r} as a {self.kind}, but register() takes "
                f"the class itself, not an instance: use register({type(cls).__name__})."
            )
        if not issubclass(cls, self.base):
            raise PluginError(
                f"plugin '{plugin}' registered {cls.__module__}.{cls.__qualname__} as a {self.kind}, "
                f"but it does not subclass resprune.{self.base.__name__}."
            )
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(
                f"plugin '{plugin}': {self.kind} class {cls.__qualname__} needs a non-empty "
                f"class attribute `name` (its registry name)."
            )
        for attr, meaning in self.required.items():
            value = getattr(cls, attr, None)
            if not isinstance(value, str) or not value:
                raise PluginError(
                    f"plugin '{plugin}': {self.kind} class {cls.__module__}.{cls.__qualname__} has no class attribute "
                    f"`{attr}` ({meaning}); set it, e.g. {attr} = \"{name}\".")
        names = [name, *aliases, *getattr(cls, "aliases", ())]
        for key in dict.fromkeys(names):
            old = self._entries.get(key)
            if old is not None and not override and old.cls is not cls:
                raise DuplicateStrategyError(
                    f"{self.kind} '{key}' is registered twice: by plugin '{old.plugin}' "
                    f"({old.cls.__module__}.{old.cls.__qualname__}) and by plugin '{plugin}' "
                    f"({cls.__module__}.{cls.__qualname__}). Uninstall or disable one of them "
                    f"(RESPRUNE_DISABLE_PLUGINS), or register with override=True on purpose."
                )
            if old is not None and override and old.cls is not cls:
                log.warning("%s '%s' from plugin '%s' overridden by plugin '%s'", self.kind, key, old.plugin, plugin)
            self._entries[key] = Entry(key, cls, plugin, None if key == name else name)

    def get(self, name: str) -> T:
        """Return the class registered as ``name`` or raise ``UnknownStrategyError``."""
        return self.entry(name).cls

    def entry(self, name: str) -> Entry[T]:
        """Return the ``Entry`` of ``name`` (class and providing plugin)."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            close = suggest(name, self._entries)
            hint = "" if close or self.hint is None else self.hint()
            raise UnknownStrategyError(
                f"unknown {self.kind} '{name}'.{close} "
                f"Available {self.kind}s: {', '.join(self.names()) or '(none)'}.{' ' + hint if hint else ''}"
            ) from None

    def names(self, *, aliases: bool = False) -> list[str]:
        """Sorted registered names (aliases included only if asked)."""
        return sorted(k for k, e in self._entries.items() if aliases or e.alias_of is None)

    def aliases(self) -> dict[str, str]:
        """Alias -> the primary name it stands for."""
        return {k: e.alias_of for k, e in sorted(self._entries.items()) if e.alias_of is not None}

    def entries(self) -> list[Entry[T]]:
        """Entries of the primary names, sorted by name."""
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"

"""Shared fixtures: an isolated plugin host per test that registers extra plugins."""

from __future__ import annotations

import contextlib

import pytest

import resprune
from resprune.plugins import PluginHost


@pytest.fixture
def plugin_host():
    """Factory: ``plugin_host(*plugins, **kw)`` installs a fresh host for this test only."""
    old = resprune.reset_plugins(None)
    made = []

    def make(*plugins, **kwargs):
        kwargs.setdefault("autoload", False)
        host = PluginHost(plugins=plugins, **kwargs)
        resprune.reset_plugins(host)
        made.append(host)
        return host

    yield make
    resprune.reset_plugins(old)


@contextlib.contextmanager
def env(monkeypatch, **values):
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    yield

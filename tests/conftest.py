"""Shared fixtures (the resprune pytest plugin provides the rest)."""

from __future__ import annotations

import pytest


@pytest.fixture
def plugin_host(resprune_plugin_host):
    """``plugin_host(*plugins, **kw)`` installs a fresh host for this test only."""
    return resprune_plugin_host

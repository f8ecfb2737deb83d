"""resprune's pytest plugin (entry point ``pytest11``), for testing strategy plugins.

Fixtures (nothing heavy is imported until a fixture is used):

- ``tiny_llava``, ``tiny_llava_next``, ``tiny_qwen2_5_vl``, ``tiny_llava_onevision``, ``tiny_gemma3``,
  ``tiny_qwen3_vl``, ``tiny_qwen3_5``, ``tiny_internvl``:
  ``(model, processor)`` of a tiny randomly initialised backbone, built offline once per session;
- ``tiny_lvlm_factory``: ``make(model_type, seed=0)`` for other seeds;
- ``resprune_context``: a ``PruneContext`` with every standard field;
- ``resprune_plugin_host``: ``install(*plugins)`` registers plugin modules or objects in a
  fresh plugin host for one test (entry points off), so a plugin can be tested without
  installing it.

The conformance suites are base classes in ``resprune.testing.conformance``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest


@functools.cache
def _tiny(model_type: str, seed: int = 0) -> tuple[Any, Any]:
    from resprune.tiny import tiny_lvlm

    return tiny_lvlm(model_type, seed=seed)


@pytest.fixture(scope="session")
def tiny_lvlm_factory():
    """``make(model_type, seed=0) -> (model, processor)``, cached per session."""
    return _tiny


@pytest.fixture(scope="session")
def tiny_llava():
    return _tiny("llava")


@pytest.fixture(scope="session")
def tiny_llava_next():
    return _tiny("llava_next")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl():
    return _tiny("qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_llava_onevision():
    return _tiny("llava_onevision")


@pytest.fixture(scope="session")
def tiny_gemma3():
    return _tiny("gemma3")


@pytest.fixture(scope="session")
def tiny_qwen3_vl():
    return _tiny("qwen3_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_5():
    return _tiny("qwen3_5")


@pytest.fixture(scope="session")
def tiny_internvl():
    return _tiny("internvl")


@pytest.fixture
def resprune_context():
    from resprune.testing.contracts import random_context

    return random_context()


@pytest.fixture
def resprune_plugin_host():
    """``install(*plugins, **kw)``: a fresh plugin host with these plugins, for this test only."""
    import resprune
    from resprune.plugins import PluginHost

    old = resprune.reset_plugins(None)

    def install(*plugins: Any, **kwargs: Any) -> PluginHost:
        kwargs.setdefault("autoload", False)
        host = PluginHost(plugins=plugins, **kwargs)
        resprune.reset_plugins(host)
        return host

    yield install
    resprune.reset_plugins(old)

"""Shared fixtures (the resprune pytest plugin provides the rest)."""

from __future__ import annotations

import os

import pytest
import torch

# The Triton kernels run on CPU tensors through Triton's interpreter where there is no GPU.
# Triton reads TRITON_INTERPRET when it is first imported (transformers imports it when it
# loads a model), so it is set here, before any test module is collected.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def plugin_host(resprune_plugin_host):
    """``plugin_host(*plugins, **kw)`` installs a fresh host for this test only."""
    return resprune_plugin_host

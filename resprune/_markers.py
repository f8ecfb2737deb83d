"""pluggy markers of the ``resprune`` project (kept free of heavy imports)."""

import pluggy

PROJECT_NAME = "resprune"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks hook specifications (internal)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's hook implementations; public as ``resprune.hookimpl``."""

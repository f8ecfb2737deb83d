"""The release version (read by ``pyproject.toml`` and by the code that records it)."""

__version__ = "0.2.0"

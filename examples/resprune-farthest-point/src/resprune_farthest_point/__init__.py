"""An example resprune plugin (see plugin.py)."""

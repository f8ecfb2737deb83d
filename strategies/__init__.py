"""Built-in scorer, selector and metric plugins (installed as ``resprune.strategies``).

Each module is one plugin, registered through the same hooks a third-party plugin uses.
"""

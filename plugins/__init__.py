"""Mono Quant's built-in plugins.

Each module is one plugin, declared as an entry point of group ``monoquant`` in our own
``pyproject.toml`` exactly as a third-party package would declare its plugins.
"""

"""Plugins: packages that register parts (towers, bridges, data generators, benchmarks, training hooks, ...).

The built-in one is `vlmkit.shapesworld` (the demo world); others are found through the `vlmkit.plugins` entry
point group (`[project.entry-points."vlmkit.plugins"] name = "package.module"`). They are imported once, the
first time a registry is asked for a name it does not know, so a recipe can name a plugin's part without
importing it first.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

BUILTIN_PLUGINS = ("vlmkit.shapesworld",)
ENTRY_POINT_GROUP = "vlmkit.plugins"
_loaded = False


def load_plugins() -> list[str]:
    """Import every plugin module (once); returns their names."""
    global _loaded
    names = list(BUILTIN_PLUGINS) + [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    if not _loaded:
        _loaded = True
        for name in names:
            importlib.import_module(name)
    return names

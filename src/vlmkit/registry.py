"""One small registry type, used for every kind of pluggable part (towers, bridges, LLM loaders, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps string ids to builders; unknown ids raise an error that lists the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._configs: dict[str, type | None] = {}
        self._tiny: dict[str, Callable[[], dict[str, Any]]] = {}

    def register(
        self,
        name: str,
        config: type | None = None,
        tiny: Callable[[], dict[str, Any]] | None = None,
    ) -> Callable[[T], T]:
        """Register an entry under `name`, with its own config dataclass (a subclass of the family's base
        config; None: the base has every setting it needs) and `tiny`: a function returning {label: config}
        of tiny, random, download-free configs for generated tests."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._entries[name] = obj
            self._configs[name] = config
            if tiny is not None:
                self._tiny[name] = tiny
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove an entry (tests, plugins that replace one); returns it."""
        self._configs.pop(name, None)
        self._tiny.pop(name, None)
        return self._entries.pop(name)

    def config_for(self, name: str) -> type | None:
        """The config class `name` registered (None: the family's base); unknown names raise `KeyError`."""
        self.get(name)
        return self._configs.get(name)

    def tiny_configs(self) -> dict[str, Any]:
        """{"<name>" or "<name>:<label>": config} over every entry that declared tiny test configs."""
        out: dict[str, Any] = {}
        for name in sorted(self._tiny):
            for label, cfg in self._tiny[name]().items():
                out[name if label == name else f"{name}:{label}"] = cfg
        return out

    def get(self, name: str) -> T:
        if name not in self._entries:  # a plugin's part: import the plugins once, then look again
            importlib.import_module("vlmkit.plugins").load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

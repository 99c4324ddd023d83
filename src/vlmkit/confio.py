"""Typed dataclass configs from mappings and YAML: strict keys (an unknown key names itself and the allowed
ones), per-kind classes chosen by a `kind` field (`KindConfig`), dotted `key=value` overrides, YAML load/save."""

from __future__ import annotations

import dataclasses
import importlib
import io
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from vlmkit.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


class KindConfig:
    """Base of a component family's config: the value of `_key` (`kind`, or `mode` for fusion) picks the
    config class the component registered with its registry (`_registry`, "module:attribute"), so each kind
    declares its own settings in its own file. Recipes keep their shape (`bridge: {kind: qformer,
    num_queries: 32}`); a key the chosen kind does not have is reported with the keys it does have."""

    _registry: ClassVar[str]
    _key: ClassVar[str] = "kind"

    @classmethod
    def kind_class(cls, kind: str) -> type:
        """The config class registered for `kind` (the family's base when the kind declares none)."""
        module, _, attr = cls._registry.partition(":")
        registry = getattr(importlib.import_module(module), attr)  # components register on import
        try:
            found = registry.config_for(kind)
        except KeyError as err:
            raise ConfigError(str(err).strip('"')) from None
        return found or cls

    @classmethod
    def make(cls, kind: str | None = None, **fields: Any) -> Any:
        """A config of the registered class for `kind` (default: the family's default kind), e.g.
        `BridgeConfig.make("qformer", num_queries=8)`."""
        kind = kind if kind is not None else getattr(cls, cls._key)
        return from_dict(cls.kind_class(kind), {cls._key: kind, **fields})

    def resolved(self) -> Any:
        """This config as its kind's registered class (fields kept); itself when it already is one."""
        target = type(self).kind_class(getattr(self, self._key))
        if type(self) is target:
            return self
        return from_dict(target, to_dict(self))


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    tp = _strip_optional(tp)
    if value is None:
        return None
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value.resolved() if isinstance(value, KindConfig) else value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        if issubclass(tp, KindConfig):  # the kind's own config class
            kind = value.get(tp._key, getattr(tp, tp._key))
            try:
                tp = tp.kind_class(str(kind))
            except ConfigError as err:
                raise ConfigError(f"{where}.{tp._key}: {err}") from None
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; an unknown key fails naming the key and the allowed ones."""
    migrate = getattr(cls, "_migrate", None)
    if migrate is not None:
        data = migrate(data, where)
    if isinstance(cls, type) and issubclass(cls, KindConfig):  # a family's base: its kind's own class
        cls = cls.kind_class(str(data.get(cls._key, getattr(cls, cls._key))))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in hints or key not in names:
            if isinstance(cls, type) and issubclass(cls, KindConfig):
                kind = data.get(cls._key, getattr(cls, cls._key))
                raise ConfigError(
                    f"unknown config key '{path}' for {cls._key} '{kind}'; allowed: {', '.join(names)}"
                )
            raise ConfigError(f"unknown config key '{path}'; allowed here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a value the dataclass itself refuses: name where it is
        raise ConfigError(f"{where}.{err}" if where else str(err)) from None


def drop_unknown_keys(cls: type, data: Any) -> Any:
    """`data` without the keys `cls` (recursively, each kind's own class) does not have: for configs vlmkit
    wrote itself in an older version (where e.g. every bridge kind carried every bridge setting)."""
    if not isinstance(data, dict) or not _is_dataclass_type(cls):
        return data
    if issubclass(cls, KindConfig):
        cls = cls.kind_class(str(data.get(cls._key, getattr(cls, cls._key))))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        if key not in names:
            continue
        tp = _strip_optional(hints[key])
        if typing.get_origin(tp) is list and isinstance(value, list):
            (item,) = typing.get_args(tp) or (Any,)
            value = [drop_unknown_keys(_strip_optional(item), v) for v in value]
        else:
            value = drop_unknown_keys(tp, value)
        out[key] = value
    return out


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, in place; returns it.

    A numeric part indexes a list (`stages.1.lr=1e-4`).
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:i])
                    raise ConfigError(
                        f"override '{key}': '{where}' has {len(node)} entries; '{part}' is not one"
                    )
                if last:
                    node[int(part)] = yaml.safe_load(raw)
                else:
                    node = node[int(part)]
                continue
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                if not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def save_yaml(obj: Any, path: str | Path) -> None:
    """Write `obj` as YAML, atomically: a crash mid-write leaves the previous file (or none), never half of one
    (config.yaml; pretrain_config.yaml marks a finished pretraining)."""
    buf = io.StringIO()
    yaml.safe_dump(to_dict(obj), buf, sort_keys=False)
    atomic_write_text(path, buf.getvalue())

"""Typed views of config nodes.

Each config group is read by exactly one module, which declares a dataclass for it and calls `typed()`.
A stage then receives only that dataclass: what it depends on is exactly what goes into its cache key.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def typed(cls: type[T], node: Any, where: str) -> T:
    """Build dataclass `cls` from a config node, naming `where.key` in every error.

    Unknown keys are errors (a typo must not silently fall back to a default), missing keys take the
    dataclass default or are errors when it has none.
    """
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(node).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name not in node:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing key {where}.{name}")
            continue
        value = node[name]
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = typed(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is list and value is not None:
            (item,) = typing.get_args(hint) or (Any,)
            if dataclasses.is_dataclass(item):
                value = [typed(item, v, f"{where}.{name}[{i}]") for i, v in enumerate(value)]
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def as_dict(obj: Any) -> dict:
    """A dataclass as plain data (for cache keys, params and meta files)."""
    return dataclasses.asdict(obj)

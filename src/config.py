"""Typed views of config nodes.

Each config group is read by exactly one module, which declares a dataclass for it and calls `typed()`.
A stage then receives only that dataclass: what it depends on is exactly what goes into its cache key.

`typed()` checks every value against its field's type annotation and the bounds in its metadata
(`knob(default, "help", min=..., max=...)`), so `judging.n=2.5` or `train.learning_rate=fast` fail with one
line naming the key before anything loads. (Hydra structured configs would check types too, but would make
the YAML files and a ConfigStore two places that declare each group; here the YAML is the one source of
values and the dataclass the one source of types and bounds.)
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

T = TypeVar("T")

# Source checkout / editable install: the top-level conf/. Wheel install: the copy packaged as src/conf.
_HERE = Path(__file__).resolve().parent
CONF_DIR = str(_HERE / "conf" if (_HERE / "conf" / "config.yaml").exists() else _HERE.parent / "conf")


def unwritable(path: Path, key: str) -> str | None:
    """Why `path` cannot serve as an output directory (read-only, a path under a file, a full disk), as one line
    naming `key`, or None. A probe file is written and removed: permissions alone do not tell (root, ACLs, quotas)."""
    import os

    probe = path / f".ste-write-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return f"{key}={path}: cannot write there ({e.strerror or e}); choose a writable directory ({key}=...)"
    return None


def register_resolvers() -> None:
    """The interpolations conf/ uses beyond OmegaConf's own (conf/hydra/launcher/slurm.yaml sizes each SLURM job
    from the model specs). Registered when this module is imported, before anything composes conf/."""
    OmegaConf.register_new_resolver("ste_max", lambda *xs: max(int(x) for x in xs), replace=True)
    OmegaConf.register_new_resolver("ste_mul", lambda a, b: int(a) * int(b), replace=True)


register_resolvers()


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


def knob(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None, max: float | None = None,
         gt: float | None = None, lt: float | None = None, factory: Any = None) -> Any:
    """A dataclass field with help text and bounds, checked by `typed()` before anything loads: inclusive
    (`min`, `max`) or exclusive (`gt`, `lt`). A None value of an optional field is not checked. `factory`: a
    default_factory instead of a default."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _bounds_error(value: float, meta: Mapping) -> str | None:
    """Which bound `value` breaks, as 'must be ...', or None."""
    lo, hi, gt, lt = meta.get("min"), meta.get("max"), meta.get("gt"), meta.get("lt")
    parts = [f">= {lo}" if lo is not None else None, f"> {gt}" if gt is not None else None,
             f"<= {hi}" if hi is not None else None, f"< {lt}" if lt is not None else None]
    broken = ((lo is not None and value < lo) or (gt is not None and value <= gt)
              or (hi is not None and value > hi) or (lt is not None and value >= lt))
    return "must be " + " and ".join(p for p in parts if p) if broken else None


def _check(value: Any, hint: Any, where: str) -> Any:
    """`value` if it has type `hint` (ints accepted for floats), else ConfigError naming `where`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}: use one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        item = args[0] if args else Any
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}: expected a mapping")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return value  # an int stays an int: cache keys hash the value as written
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    return value  # other annotations (nested dataclasses are handled by typed)


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
        elif value is not None or not _optional(hint):
            value = _check(value, hint, f"{where}.{name}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                broken = _bounds_error(value, f.metadata)
                if broken:
                    helptext = f" ({f.metadata['help']})" if f.metadata.get("help") else ""
                    raise ConfigError(f"{where}.{name}={value!r}: {broken}{helptext}")
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def as_dict(obj: Any) -> dict:
    """A dataclass as plain data (for cache keys, params and meta files)."""
    return dataclasses.asdict(obj)

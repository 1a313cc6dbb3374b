"""Experiment configs: a YAML file plus dotted command-line overrides into typed dataclasses.

``load_config(TrainConfig, "exp.yaml", ["optim.lr=5e-4", "data.images=1024"])`` builds the
nested dataclasses, coerces values to the annotated types and rejects unknown keys with the
dotted path of the offending key. Validation itself lives in each dataclass' ``__post_init__``
so that it runs once, before any GPU time is spent.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

import yaml

from beit3.model.config import ConfigError

T = TypeVar("T")


def _parse_scalar(text: str) -> Any:
    """YAML scalar parsing, plus the float forms PyYAML leaves as strings (``1e-3``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _split_list(text: str) -> list[str]:
    """Split ``a,b,c`` on commas outside braces (``shards-{a,b}.tar`` stays one item)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [i for i in items + [cur] if i.strip()]


def _coerce(value: Any, tp: Any, path: str, error: type[ConfigError] = ConfigError) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, error)
            except ConfigError as e:
                errors.append(str(e))
        raise error(f"{path}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise error(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, path, error)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [_parse_scalar(v) for v in _split_list(value)]
        if not isinstance(value, (list, tuple)):
            raise error(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{path}[{i}]", error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict,):
        if not isinstance(value, Mapping):
            raise error(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise error(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise error(f"{path}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise error(f"{path}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise error(f"{path}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise error(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise error(f"{path}: expected a number, got {value!r}") from None
    if tp is str:  # an empty value (``key=`` or ``key:`` in YAML) is None: refused, not the string "None"
        if value is None or isinstance(value, (dict, list)):
            raise error(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type[T], data: Mapping[str, Any], path: str = "", error: type[ConfigError] = ConfigError) -> T:
    """Build dataclass ``cls`` from a nested mapping, coercing values to the annotated types;
    unknown keys raise ``error`` (a ``ConfigError``) naming the dotted path (and the new place of a key
    listed in the class's ``MOVED`` mapping)."""
    if not isinstance(data, Mapping):
        raise error(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = [u for u in unknown if u in getattr(cls, "MOVED", {})]  # a ClassVar: old key -> its new place
    if moved:
        raise error(f"{'.'.join(filter(None, [path, moved[0]]))}: moved to {cls.MOVED[moved[0]]}")
    if unknown:
        where = path or cls.__name__
        raise error(f"{where}: unknown key(s) {['.'.join(filter(None, [path, u])) for u in unknown]}; "
                          f"known: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{path}.{name}" if path else name, error)
              for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise error(f"{path or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts/lists (YAML/JSON serializable)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (a copy)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> validated dataclass ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    return build(cls, apply_overrides(data, list(overrides or [])))


__all__ = ["ConfigError", "load_config", "build", "to_dict", "apply_overrides"]

"""Typed conversion of plain YAML data into dataclasses, with errors that point at the source.

Recipes and every technique's config section go through `build_dataclass`, so a wrong key or
type is reported the same way everywhere: file, line, dotted key, what was expected and the
nearest valid name.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pgolf.errors import ConfigError, suggest


@dataclass
class Provenance:
    """Where each dotted key of a merged YAML document came from: path -> (file, line)."""

    locations: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    default_file: str | None = None

    def where(self, key: str) -> tuple[str | None, int | None]:
        probe = key
        while probe:
            if probe in self.locations:
                return self.locations[probe]
            probe = probe.rpartition(".")[0]
        return self.default_file, None

    def error(self, key: str, message: str, hint: str | None = None) -> ConfigError:
        file, line = self.where(key)
        return ConfigError(message, file=file, line=line, key=key, hint=hint)


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str, prov: Provenance) -> Any:
    """Check `value` against the annotation `tp`, converting int->float where YAML lost the point."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        hint = suggest(str(value), [str(a) for a in get_args(tp)])
        raise prov.error(key, f"expected {describe_type(tp)}, got {value!r}", hint)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, prov)
            except ConfigError:
                continue
        raise prov.error(key, f"expected {describe_type(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise prov.error(key, f"expected {describe_type(tp)}, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]", prov) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise prov.error(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, prov)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise prov.error(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise prov.error(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise prov.error(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise prov.error(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def build_dataclass(cls: type, data: Any, prefix: str, prov: Provenance) -> Any:
    """Build `cls` from a mapping, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise prov.error(prefix or "(top level)", f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = suggest(str(key), names) or f"Valid keys: {', '.join(names)}."
            raise prov.error(dotted, f"unknown key '{key}'", hint)
        kwargs[key] = coerce(value, hints[key], dotted, prov)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise prov.error(prefix or "(top level)", str(exc)) from None
    check = getattr(obj, "validate", None)
    if callable(check):
        problem = check()
        if problem:
            key, message = problem
            raise prov.error(f"{prefix}.{key}" if prefix else key, message)
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to JSON/YAML-safe builtins (for config.yaml and cache keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


__all__ = [
    "Provenance",
    "build_dataclass",
    "coerce",
    "describe_type",
    "field_names",
    "to_plain",
]

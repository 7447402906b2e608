"""Typed conversion of plain YAML data into dataclasses, with errors that point at the source.

Recipes and every technique's config section go through `build_dataclass`, so a wrong key or
type is reported the same way everywhere: file, line, dotted key, what was expected and the
nearest valid name.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pgolf.errors import ConfigError, PgolfError, raise_collected, suggest


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
        if isinstance(value, bool) and {"on", "off"} <= set(get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
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
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(coerce(v, item_tp, f"{key}[{i}]", prov))
            except ConfigError as exc:  # report every bad item, not just the first
                errors.append(exc)
        raise_collected(errors)
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
    """Build `cls` from a mapping, rejecting unknown keys with a suggestion.

    Every problem in the section is collected (unknown keys, wrongly typed values, nested
    sections, failed `validate()` checks) and raised together: one problem as itself, several
    as a `ConfigErrors` that lists each with its file, line and key.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise prov.error(prefix or "(top level)", f"expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    errors: list[PgolfError] = []
    bad_values = False
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            hint = suggest(str(key), names) or f"Valid keys: {', '.join(names)}."
            errors.append(prov.error(dotted, f"unknown key '{key}'", hint))
            continue
        try:
            kwargs[key] = coerce(value, hints[key], dotted, prov)
        except ConfigError as exc:
            errors.append(exc)
            bad_values = True
    obj, missing = None, None
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = str(exc)
    if missing is not None and not bad_values:  # (a field that failed its type check is already reported)
        errors.append(prov.error(prefix or "(top level)", missing))
    check = getattr(obj, "validate", None)
    if obj is not None and callable(check) and not bad_values:  # defaults standing in for bad values would mislead
        for key, message in validation_problems(check()):
            errors.append(prov.error(f"{prefix}.{key}" if prefix else key, message))
    raise_collected(errors)
    return obj


def validation_problems(result: Any) -> list[tuple[str, str]]:
    """A `validate()` result as a list of (key, message): it may return a list of them, one
    (key, message) tuple (the older form, still accepted from plugins) or None."""
    if not result:
        return []
    if isinstance(result, tuple) and len(result) == 2 and all(isinstance(x, str) for x in result):
        return [result]
    return [tuple(p) for p in result]  # type: ignore[misc]


def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to JSON/YAML-safe builtins (for config.yaml and cache keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


__all__ = [
    "Provenance",
    "build_dataclass",
    "coerce",
    "describe_type",
    "freeze",
    "thawed_copy",
    "to_plain",
    "validation_problems",
]


_FROZEN: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass of `cls` whose instances refuse attribute writes (isinstance still holds)."""
    if cls not in _FROZEN:
        def refuse(self: Any, name: str, value: Any) -> None:
            raise dataclasses.FrozenInstanceError(
                f"cannot set {cls.__name__}.{name}: the recipe is read-only once techniques have configured it "
                "(change it in pgolf_configure)")

        _FROZEN[cls] = type(cls.__name__, (cls,), {"__setattr__": refuse, "__delattr__": refuse,
                                                   "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _FROZEN[cls]


def freeze(obj: Any) -> None:
    """Make a dataclass tree read-only in place (the recipe after configure)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return
    for f in dataclasses.fields(obj):
        freeze(getattr(obj, f.name))
    if type(obj) not in _FROZEN.values():
        obj.__class__ = _frozen_class(type(obj))


def thawed_copy(obj: Any) -> Any:
    """A deep copy that can be written again (a frozen recipe reused by a new session)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return copy.deepcopy(obj)
    cls = type(obj)
    base = cls.__bases__[0] if cls in _FROZEN.values() else cls
    new = base.__new__(base)
    for name, value in vars(obj).items():
        object.__setattr__(new, name, thawed_copy(value))
    return new

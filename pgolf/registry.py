"""Technique discovery, validation, ordering and the traced plugin manager.

Installed never means active: a technique runs only when a recipe names it. Names resolve,
in this order, to the built-ins (`pgolf_plugins.BUILTINS`), to installed packages' entry
points in the group ``pgolf.techniques``, or to an explicit ``module:attr``. Enabled
techniques are ordered by their declared ``after``/``before`` (a topological sort with name
order breaking ties, so the recipe's order never matters) and registered in reverse, so
pluggy's last-in-first-out calling runs plain hooks in that order.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal

import pluggy

from pgolf import hookspecs
from pgolf.config import Provenance, build_dataclass, to_plain
from pgolf.errors import RegistryError, suggest

ENTRY_POINT_GROUP = "pgolf.techniques"
Stage = Literal["train", "export", "eval"]
STAGES: tuple[Stage, ...] = ("train", "export", "eval")
HOST_PLUGIN = "host"


@dataclass
class NoConfig:
    """For techniques without parameters."""


class Technique:
    """Base class for techniques: static metadata plus hook implementations.

    Subclasses set the class attributes and implement ``pgolf_*`` methods (any method with
    that prefix is a hook implementation; ``@hookimpl(...)`` adds options such as
    ``wrapper=True``). ``stage`` is the earliest lifecycle stage the technique changes; it
    decides which cached results an ablation may reuse when the technique is toggled.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    stage: ClassVar[Stage] = "train"
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    record: ClassVar[str] = ""  # the challenge record(s) it follows, for `pgolf plugins`

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def stage_for(self) -> Stage:
        """The stage this configured instance changes (override when it depends on config)."""
        return self.stage

    @classmethod
    def hook_names(cls) -> list[str]:
        return sorted(n for n, v in inspect.getmembers(cls) if n.startswith("pgolf_") and callable(v))


# --- discovery -------------------------------------------------------------------------------


def builtin_techniques() -> dict[str, str]:
    from pgolf_plugins import BUILTINS

    return dict(BUILTINS)


def entry_point_techniques() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_names() -> list[str]:
    return sorted({*builtin_techniques(), *entry_point_techniques()})


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def load_technique_class(name: str, prov: Provenance | None = None) -> type[Technique]:
    """Find the class for a recipe's technique name, or fail naming the nearest known one."""
    prov = prov or Provenance()
    key = f"techniques.{name}"
    builtins = builtin_techniques()
    try:
        if name in builtins:
            cls = _import_target(builtins[name])
        elif name in (eps := entry_point_techniques()):
            cls = eps[name].load()
        elif ":" in name:
            cls = _import_target(name)
        else:
            hint = suggest(name, known_names()) or "Run `pgolf plugins` to list installed techniques."
            raise prov.error(key, f"unknown technique '{name}'", hint)
    except (ImportError, AttributeError) as exc:
        raise prov.error(key, f"technique '{name}' could not be loaded ({exc})",
                         "Check that its package is installed in this environment.") from None
    if not (isinstance(cls, type) and issubclass(cls, Technique)):
        raise prov.error(key, f"'{name}' does not name a pgolf Technique subclass")
    return cls


# --- resolution --------------------------------------------------------------------------


@dataclass
class Enabled:
    """One enabled technique: the recipe key it was named by, its class and instance."""

    key: str
    cls: type[Technique]
    instance: Technique

    @property
    def name(self) -> str:
        return self.cls.name or self.key

    @property
    def stage(self) -> Stage:
        return self.instance.stage_for()

    def config_dict(self) -> dict[str, Any]:
        return to_plain(self.instance.config)


def _ids(enabled: Iterable[Enabled]) -> dict[str, Enabled]:
    out: dict[str, Enabled] = {}
    for e in enabled:
        out[e.name] = e
        out[e.key] = e
    return out


def topological_order(items: list[Enabled]) -> list[Enabled]:
    """Order by after/before constraints; ties broken by name; a cycle names its members."""
    by_name = {e.name: e for e in items}
    aliases = _ids(items)
    edges: dict[str, set[str]] = {e.name: set() for e in items}  # node -> nodes that must come first
    for e in items:
        for other in e.cls.after:
            if other in aliases:
                edges[e.name].add(aliases[other].name)
        for other in e.cls.before:
            if other in aliases:
                edges[aliases[other].name].add(e.name)
    order: list[str] = []
    remaining = {k: set(v) for k, v in edges.items()}
    while remaining:
        ready = sorted(k for k, deps in remaining.items() if not deps)
        if not ready:
            cycle = sorted(remaining)
            raise RegistryError(
                f"techniques {', '.join(cycle)} form an ordering cycle through their after/before declarations",
                hint="Remove one of them from the recipe or fix the declarations.",
            )
        node = ready[0]
        order.append(node)
        del remaining[node]
        for deps in remaining.values():
            deps.discard(node)
    return [by_name[n] for n in order]


def firstresult_hooks() -> set[str]:
    return {
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("pgolf_") and getattr(fn, f"{hookspecs.PROJECT}_spec", {}).get("firstresult")
    }


def resolve(techniques: dict[str, Any], prov: Provenance | None = None) -> list[Enabled]:
    """Validate every named technique's config and check requires/conflicts/providers/order."""
    prov = prov or Provenance()
    enabled: list[Enabled] = []
    for key, params in techniques.items():
        cls = load_technique_class(key, prov)
        config = build_dataclass(cls.Config, params or {}, f"techniques.{key}", prov)
        enabled.append(Enabled(key, cls, cls(config)))
    names = _ids(enabled)
    for e in enabled:
        for req in e.cls.requires:
            if req not in names:
                raise prov.error(f"techniques.{e.key}", f"technique '{e.name}' requires '{req}', which the recipe does not enable",
                                 f"Add '{req}' under techniques:.")
        for other in e.cls.conflicts:
            if other in names and names[other] is not e:
                raise prov.error(f"techniques.{e.key}", f"techniques '{e.name}' and '{names[other].name}' conflict",
                                 "Enable only one of them.")
    providers: dict[str, list[str]] = {}
    for e in enabled:
        for hook in set(e.cls.hook_names()) & firstresult_hooks():
            opts = getattr(getattr(e.cls, hook), f"{hookspecs.PROJECT}_impl", None) or {}
            if not (opts.get("wrapper") or opts.get("hookwrapper")):  # wrappers transform, they don't provide
                providers.setdefault(hook, []).append(e.name)
    for hook, who in sorted(providers.items()):
        if len(who) > 1:
            raise RegistryError(
                f"techniques {' and '.join(sorted(who))} both provide '{hook}'; only one may supply it",
                key="techniques",
                file=prov.default_file,
                hint="Enable only one of them.",
            )
    return topological_order(enabled)


# --- the plugin manager with per-implementation tracing ---------------------------------------


@dataclass
class HookStats:
    calls: int = 0
    seconds: float = 0.0


@dataclass
class Trace:
    """Per technique, per hook: how often it fired and the seconds it took."""

    stats: dict[str, dict[str, HookStats]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # hooks in first-call order

    def record(self, plugin: str, hook: str, seconds: float) -> None:
        entry = self.stats.setdefault(plugin, {}).setdefault(hook, HookStats())
        entry.calls += 1
        entry.seconds += seconds
        if hook not in self.order:
            self.order.append(hook)

    def calls(self, plugin: str) -> int:
        return sum(s.calls for s in self.stats.get(plugin, {}).values())

    def merge(self, other: dict[str, dict[str, dict[str, float]]]) -> None:
        for plugin, hooks in other.items():
            for hook, s in hooks.items():
                entry = self.stats.setdefault(plugin, {}).setdefault(hook, HookStats())
                entry.calls += int(s["calls"])
                entry.seconds += float(s["seconds"])

    def to_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            plugin: {hook: {"calls": s.calls, "seconds": round(s.seconds, 6)} for hook, s in hooks.items()}
            for plugin, hooks in self.stats.items()
        }


class PgolfPluginManager(pluggy.PluginManager):
    """Treats every ``pgolf_*`` method as a hook implementation, as pytest does for ``pytest_*``."""

    def parse_hookimpl_opts(self, plugin: object, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith("pgolf_") and inspect.isroutine(getattr(plugin, name, None)):
            return {}
        return opts


def _traced(method: Any, plugin_name: str, hook: str, trace: Trace) -> Any:
    """Wrap one bound hook method so each call is timed into the trace."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                return (yield from method(*args, **kwargs))
            finally:
                trace.record(plugin_name, hook, time.perf_counter() - start)

        return gen_wrapper

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            trace.record(plugin_name, hook, time.perf_counter() - start)

    return wrapper


def _instrument(plugin: object, name: str, trace: Trace) -> None:
    for attr in dir(plugin):
        if attr.startswith("pgolf_"):
            method = getattr(plugin, attr)
            if inspect.isroutine(method):
                setattr(plugin, attr, _traced(method, name, attr, trace))


def build_plugin_manager(enabled: list[Enabled], host: object | None, trace: Trace) -> pluggy.PluginManager:
    """Register the host defaults and the enabled techniques so calls follow the resolved order."""
    pm = PgolfPluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if host is not None:
        _instrument(host, HOST_PLUGIN, trace)
        pm.register(host, name=HOST_PLUGIN)
    for e in reversed(enabled):
        _instrument(e.instance, e.name, trace)
        try:
            pm.register(e.instance, name=e.name)
        except pluggy.PluginValidationError as exc:
            raise RegistryError(f"technique '{e.name}' has an invalid hook implementation: {exc}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise RegistryError(
            f"{exc}", hint="Hook names must match pgolf/hookspecs.py; run `pgolf plugins` to see the hooks."
        ) from None
    return pm


def silent_techniques(enabled: list[Enabled], trace: Trace) -> list[str]:
    """Enabled techniques whose hooks never fired: a no-op ablation row is a wrong result."""
    return [e.name for e in enabled if trace.calls(e.name) == 0]


def describe(cls: type[Technique]) -> dict[str, Any]:
    """Static facts about a technique class, for `pgolf plugins`."""
    return {
        "name": cls.name,
        "summary": cls.summary,
        "stage": cls.stage,
        "hooks": cls.hook_names(),
        "requires": list(cls.requires),
        "conflicts": list(cls.conflicts),
        "after": list(cls.after),
        "before": list(cls.before),
        "record": cls.record,
        "config": {f.name: to_plain(f.default) if f.default is not dataclasses.MISSING else None
                   for f in dataclasses.fields(cls.Config)},
        "module": cls.__module__,
    }

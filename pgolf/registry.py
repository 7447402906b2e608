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
from typing import Any

import pluggy
import torch

from pgolf import hookspecs
from pgolf.api import PROJECT, STAGES, Stage, Technique
from pgolf.config import Provenance, build_dataclass, to_plain
from pgolf.context import RunContext
from pgolf.data.textdata import TextTransform
from pgolf.errors import DataError, PgolfError, RegistryError, suggest
from pgolf.recipe import Recipe

ENTRY_POINT_GROUP = "pgolf.techniques"
HOST_PLUGIN = "host"
CONFIGURE_HOOK = "pgolf_configure"


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
        if name.startswith("pgolf_") and getattr(fn, f"{PROJECT}_spec", {}).get("firstresult")
    }


def resolve(techniques: dict[str, Any], prov: Provenance | None = None) -> list[Enabled]:
    """Validate every named technique's config and check requires/conflicts/providers/order.

    Every unknown technique, bad parameter, unmet requirement, conflict and doubly provided
    hook is collected and raised together (one problem as itself, several as `ConfigErrors`).
    """
    from pgolf.errors import raise_collected

    prov = prov or Provenance()
    errors: list[PgolfError] = []
    enabled: list[Enabled] = []
    for key, params in techniques.items():
        try:
            cls = load_technique_class(key, prov)
            config = build_dataclass(cls.Config, params or {}, f"techniques.{key}", prov)
        except PgolfError as exc:
            errors.append(exc)
            continue
        enabled.append(Enabled(key, cls, cls(config)))
    names = _ids(enabled)
    loaded = set(names) | set(techniques)  # one that failed to load is reported already, not as missing
    conflicting: set[frozenset[str]] = set()
    for e in enabled:
        for req in e.cls.requires:
            if req not in loaded:
                errors.append(prov.error(f"techniques.{e.key}",
                                         f"technique '{e.name}' requires '{req}', which the recipe does not enable",
                                         f"Add '{req}' under techniques:."))
        for other in e.cls.conflicts:
            pair = frozenset((e.name, names[other].name)) if other in names else frozenset()
            if other in names and names[other] is not e and pair not in conflicting:
                conflicting.add(pair)
                errors.append(prov.error(f"techniques.{e.key}", f"techniques '{e.name}' and '{names[other].name}' conflict",
                                         "Enable only one of them."))
    providers: dict[str, list[str]] = {}
    for e in enabled:
        for hook in set(e.cls.hook_names()) & firstresult_hooks():
            opts = getattr(getattr(e.cls, hook), f"{PROJECT}_impl", None) or {}
            if not (opts.get("wrapper") or opts.get("hookwrapper")):  # wrappers transform, they don't provide
                providers.setdefault(hook, []).append(e.name)
    for hook, who in sorted(providers.items()):
        if len(who) > 1:
            errors.append(RegistryError(
                f"techniques {' and '.join(sorted(who))} both provide '{hook}'; only one may supply it",
                key="techniques",
                file=prov.default_file,
                hint="Enable only one of them.",
            ))
    raise_collected(errors)
    return topological_order(enabled)


# --- the plugin manager with per-implementation tracing ---------------------------------------


@dataclass
class HookStats:
    calls: int = 0
    seconds: float = 0.0


@dataclass
class Trace:
    """Per technique, per hook: how often it fired and the seconds it took.

    ``configured`` names the techniques whose ``pgolf_configure`` changed the recipe: for a
    technique that acts only by configuring the host (XSA sets a model field), that is its act.
    """

    stats: dict[str, dict[str, HookStats]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # hooks in first-call order
    configured: set[str] = field(default_factory=set)

    def record(self, plugin: str, hook: str, seconds: float) -> None:
        entry = self.stats.setdefault(plugin, {}).setdefault(hook, HookStats())
        entry.calls += 1
        entry.seconds += seconds
        if hook not in self.order:
            self.order.append(hook)

    def calls(self, plugin: str, hooks: Iterable[str] | None = None) -> int:
        wanted = None if hooks is None else set(hooks)
        return sum(s.calls for h, s in self.stats.get(plugin, {}).items() if wanted is None or h in wanted)

    def acted(self, plugin: str, stage: Stage) -> bool:
        """Whether a hook of `stage` or a later stage fired, or its configure changed the recipe."""
        later = set(STAGES[STAGES.index(stage):])
        return plugin in self.configured or self.calls(
            plugin, [h for h, s in hookspecs.HOOK_STAGES.items() if s in later]) > 0

    def merge(self, other: dict[str, dict[str, dict[str, float]]], sign: int = 1) -> None:
        """Add a stored trace (a stage product's); `sign=-1` takes one away."""
        for plugin, hooks in other.items():
            for hook, s in hooks.items():
                entry = self.stats.setdefault(plugin, {}).setdefault(hook, HookStats())
                entry.calls += sign * int(s["calls"])
                entry.seconds += sign * float(s["seconds"])
                if entry.calls <= 0:
                    del self.stats[plugin][hook]
            if not self.stats.get(plugin, True):
                del self.stats[plugin]

    def since(self, mark: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        """The calls made after `mark` (an earlier `to_dict()` of this trace): one stage's share."""
        out = Trace()
        out.merge(self.to_dict())
        out.merge(mark, sign=-1)
        return out.to_dict()

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

    if hook == CONFIGURE_HOOK:

        @functools.wraps(method)
        def configure_wrapper(*args: Any, **kwargs: Any) -> Any:
            ctx = kwargs.get("ctx", args[0] if args else None)
            before = ctx.recipe.to_dict()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                trace.record(plugin_name, hook, time.perf_counter() - start)
                if ctx.recipe.to_dict() != before:
                    trace.configured.add(plugin_name)

        return configure_wrapper

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
    pm = PgolfPluginManager(PROJECT)
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


def technique_problems(techniques: dict[str, Any], prov: Provenance) -> list[PgolfError]:
    """What `resolve` would report about a recipe's techniques, without raising (for `load_recipe`)."""
    try:
        resolve(techniques, prov)
    except PgolfError as exc:
        return [exc]
    return []


def silent_techniques(enabled: list[Enabled], trace: Trace) -> list[str]:
    """Enabled techniques that never acted: no hook of their declared stage (or a later one) fired
    and their configure changed nothing. Session-time hooks (configure, config errors) and
    metrics do not count: a no-op ablation row is a wrong result."""
    return [e.name for e in enabled if not trace.acted(e.name, e.stage)]


def check_declared_stages(enabled: list[Enabled], prov: Provenance) -> None:
    """Fail before anything runs when a technique implements a hook that changes a stage earlier
    than the one it declares (``contribute`` hooks may return None, so they are allowed)."""
    for e in enabled:
        earlier = set(STAGES[:STAGES.index(e.stage)])
        early = sorted(h for h in e.cls.hook_names()
                       if hookspecs.HOOK_STAGES.get(h) in earlier and not h.startswith("pgolf_contribute_"))
        if early:
            stage = hookspecs.HOOK_STAGES[early[0]]
            raise prov.error(
                f"techniques.{e.key}",
                f"technique '{e.name}' declares stage '{e.stage}' but implements {', '.join(early)}, which "
                f"change the {stage} stage; an ablation would reuse {stage} outputs made without it",
                f"Declare stage = '{stage}' (the earliest stage it changes) on the technique.")


def transform_by_name(name: str | None) -> TextTransform | None:
    """The text transform a technique of this name provides (for `pgolf data text --transform`)."""
    if name is None:
        return None
    provide = getattr(load_technique_class(name)(), "pgolf_provide_text_transform", None)
    transform = provide(ctx=RunContext(recipe=Recipe(), device=torch.device("cpu"))) if provide else None
    if transform is None:
        raise DataError(f"technique '{name}' provides no text transform", hint="Text transforms come from e.g. casefold.")
    return transform


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
        "follows": cls.follows,
        "config": {f.name: to_plain(f.default) if f.default is not dataclasses.MISSING else None
                   for f in dataclasses.fields(cls.Config)},
        "module": cls.__module__,
    }

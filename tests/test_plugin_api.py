"""The wall between techniques and the host, enforced.

A technique sees pgolf only through `pgolf.api` (its tests add `pgolf.testing`), only the host
program (`pgolf/host.py`) calls hooks, pgolf's own modules import each other without a circle,
the run context carries no way around the wall, the recipe is read-only after configure, and a
technique that never acts at its declared stage fails the run. The static checks read the source
with `ast`, so an import inside a function or under ``TYPE_CHECKING`` counts like any other.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pgolf.api import Technique
from pgolf.errors import RegistryError
from pgolf.host import run
from pgolf.reporter import Reporter
from pgolf.testing import assert_fired
from tests.conftest import REPO

M = "tests.test_plugin_api"
QUIET = Reporter(quiet=True)
PGOLF = REPO / "pgolf"
TECHNIQUE_ROOTS = (REPO / "plugins", REPO / "examples")
SKIP_PARTS = {"build", "dist", "__pycache__", ".venv", ".git"}


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py")
                  if not any(part in SKIP_PARTS or part.endswith(".egg-info") for part in p.relative_to(root).parts))


def module_name(path: Path, root: Path, package: str) -> tuple[str, bool]:
    """Dotted name of `path` inside `package` rooted at `root`, and whether it is a package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join([package, *parts]), is_package


def imports(path: Path, module: str = "", is_package: bool = False) -> Iterator[tuple[int, str, list[str]]]:
    """Every import in the file, wherever it sits: (line, module imported from, names taken).

    ``import a.b`` yields ("a.b", []); ``from a import b, c`` yields ("a", ["b", "c"]) with relative
    imports resolved against `module`; ``importlib.import_module("a.b")`` and ``__import__("a.b")``
    with a literal name count as ``import a.b``.
    """
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            yield node.lineno, base, [a.name for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value, []


def pgolf_modules() -> dict[str, Path]:
    return {module_name(p, PGOLF, "pgolf")[0]: p for p in python_files(PGOLF)}


def imported_pgolf_modules(base: str, names: list[str], known: dict[str, Path] | set[str]) -> list[str]:
    """The pgolf modules an import statement loads: ``from pgolf import x`` is pgolf.x when x is a module."""
    if not (base == "pgolf" or base.startswith("pgolf.")):
        return []
    submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
    if submodules and len(submodules) == len(names):
        return submodules
    return [*submodules, base]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- (a) techniques import pgolf.api only ----------------------------------------------------------


def is_example_test(path: Path) -> bool:
    return "tests" in path.relative_to(REPO / "examples").parts or path.name.startswith("test_") \
        or path.name == "conftest.py"


def test_techniques_import_no_pgolf_module_but_the_api():
    known = pgolf_modules()
    files = [p for root in TECHNIQUE_ROOTS for p in python_files(root)]
    assert len(files) > 20, "the scan found the plugins and the example package"
    violations = []
    for path in files:
        allowed = {"pgolf.api"} | ({"pgolf.testing"} if path.is_relative_to(REPO / "examples")
                                   and is_example_test(path) else set())
        for line, base, names in imports(path):
            for target in imported_pgolf_modules(base, names, known):
                if target not in allowed:
                    violations.append(f"{relative(path)}:{line} imports {target}")
    assert not violations, ("techniques may import only pgolf.api (and their tests pgolf.testing); add a "
                            "re-export to pgolf/api.py or a service instead:\n  " + "\n  ".join(violations))


def test_no_technique_imports_another_technique():
    from pgolf_plugins import BUILTINS

    technique_modules = {target.partition(":")[0] for target in BUILTINS.values()}
    violations = []
    for path in python_files(REPO / "plugins"):
        own, is_package = module_name(path, REPO / "plugins", "pgolf_plugins")
        for line, base, names in imports(path, own, is_package):
            targets = [base, *(f"{base}.{n}" for n in names)]
            for target in targets:
                if target in technique_modules and target != own:
                    violations.append(f"{relative(path)}:{line} imports {target}")
    assert not violations, ("a technique must not import another technique's module (move shared code into "
                            "the host behind pgolf.api):\n  " + "\n  ".join(violations))


def test_techniques_touch_no_private_part_of_the_context():
    """`ctx.data._source` would reach the validation tokens around the data view."""
    violations = []
    for path in (p for root in TECHNIQUE_ROOTS for p in python_files(root)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id == "ctx":
                    violations.append(f"{relative(path)}:{node.lineno} reads {ast.unparse(node)}")
    assert not violations, "\n  ".join(["techniques use the context's public surface only:", *violations])


# --- (b) only the host program calls hooks ---------------------------------------------------------


def is_hook_relay(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "hook") or (isinstance(node, ast.Attribute) and node.attr == "hook")


def hook_calls(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("pgolf_") and is_hook_relay(node.value):
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Attribute) and node.attr == "subset_hook_caller" \
                or isinstance(node, ast.Name) and node.id == "subset_hook_caller":
            yield node.lineno, "subset_hook_caller"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                and len(node.args) >= 2 and is_hook_relay(node.args[0]) and isinstance(node.args[1], ast.Constant) \
                and str(node.args[1].value).startswith("pgolf_"):
            yield node.lineno, ast.unparse(node)


def test_only_the_host_program_calls_hooks():
    files = [p for p in python_files(PGOLF) if p != PGOLF / "host.py"]
    files += [p for root in TECHNIQUE_ROOTS for p in python_files(root)]
    violations = [f"{relative(path)}:{line} {what}" for path in files for line, what in hook_calls(path)]
    assert not violations, ("hooks are called by pgolf/host.py alone (give the caller a host function "
                            "or a service instead):\n  " + "\n  ".join(violations))


def test_the_hook_call_scan_sees_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(session, pm, hook):\n"
                      "    session.hook.pgolf_configure(ctx=None)\n"
                      "    hook.pgolf_on_scores(scores=None, ctx=None)\n"
                      "    pm.subset_hook_caller('pgolf_on_artifact_loaded', [])\n"
                      "    getattr(session.hook, 'pgolf_on_step_end')\n"
                      "    session.model.pgolf_configure(None)\n")
    assert sorted(line for line, _ in hook_calls(sample)) == [2, 3, 4, 5]


# --- (c) no import cycle among pgolf's modules -------------------------------------------------------


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """pgolf module -> the pgolf modules it imports (module level, in functions, under TYPE_CHECKING),
    and where each edge is written."""
    known = pgolf_modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    where: dict[tuple[str, str], str] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        for line, base, names in imports(path, module, is_package):
            for target in imported_pgolf_modules(base, names, known):
                while target and target not in known:  # `import pgolf.data.x.y` -> the module that exists
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
                    where.setdefault((module, target), f"{relative(path)}:{line}")
    return graph, where


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle (first node repeated at the end), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_pgolf_modules_import_each_other_without_a_cycle():
    graph, where = import_graph()
    assert "pgolf.api" in graph and graph["pgolf.host"], "the scan found pgolf's modules and their imports"
    cycle = find_cycle(graph)
    if cycle:
        edges = "\n  ".join(f"{a} -> {b}  ({where[a, b]})" for a, b in zip(cycle[:-1], cycle[1:], strict=True))
        tangled = sorted(m for m in reachable(graph, cycle[0]) if cycle[0] in reachable(graph, m))
        pytest.fail(f"pgolf's modules import each other in a cycle:\n  {edges}\n"
                    f"modules on a cycle with {cycle[0]}: {', '.join(tangled)}")


# --- (d) the API's surface ---------------------------------------------------------------------------


REMOVED_FROM_CONTEXT = ("hook", "pm", "enabled", "technique", "is_enabled", "dataset", "out_dir", "elapsed_seconds",
                        "audit_positions", "step", "frac", "lr_scale", "train_reserve_seconds")


def test_every_api_name_resolves():
    import pgolf.api as api

    assert len(api.__all__) == len(set(api.__all__)), "a name is listed twice"
    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing, f"pgolf.api.__all__ names what it does not define: {missing}"
    assert {"RunContext", "Technique", "hookimpl", "Stage", "STAGES", "DataView", "TrainClock"} <= set(api.__all__)


def test_the_run_context_offers_no_way_around_the_wall():
    from pgolf.api import DataView, RunContext
    from pgolf.recipe import Recipe

    ctx = RunContext(recipe=Recipe(), device=torch.device("cpu"))
    for holder in (RunContext, ctx):
        present = [name for name in REMOVED_FROM_CONTEXT if hasattr(holder, name)]
        assert not present, f"RunContext must not offer {present}"
    for part in ("clock", "data", "services", "stash", "recipe", "dist", "metrics", "log"):
        assert hasattr(ctx, part), part
    public = [a for a in dir(DataView(bos_id=1, vocab_size=8)) if not a.startswith("_")]
    assert not [a for a in public if "val" in a], f"the data view must not reach validation data: {public}"


# --- (e) the recipe is read-only after configure -----------------------------------------------------


class WritesRecipeLate(Technique):
    """Changes the recipe after configure: the cache keys were computed from the recipe as it was."""

    name = "writes_recipe_late"
    stage = "train"

    def pgolf_on_train_start(self, model, ctx):
        ctx.recipe.optim.matrix_lr = 0.0


class WritesRecipeInConfigErrors(Technique):
    """Changes the recipe while reporting config errors, where the trace would not see it."""

    name = "writes_recipe_in_config_errors"
    stage = "train"

    def pgolf_contribute_config_errors(self, ctx):
        ctx.recipe.optim.matrix_lr = 0.0

    def pgolf_on_step_end(self, model, ctx):
        pass


def test_writing_the_recipe_after_configure_fails_the_run(micro_recipe, tmp_path):
    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        run(micro_recipe(techniques={f"{M}:WritesRecipeLate": {}}), tmp_path, QUIET)


def test_writing_the_recipe_in_a_later_configure_hook_fails():
    from pgolf.host import Session
    from pgolf.testing import micro_recipe

    with pytest.raises(dataclasses.FrozenInstanceError, match="read-only"):
        Session(micro_recipe(techniques={f"{M}:WritesRecipeInConfigErrors": {}}), reporter=QUIET)


# --- (f) a technique acts at its declared stage, or the run fails ------------------------------------


class CalibrationWeightsOnly(Technique):
    """Its one working hook weights calibration rows, but nothing here collects calibration Hessians
    (no gptq): it never fires, and the config-error hook that does fire is no act."""

    name = "calibration_weights_only"
    stage = "export"

    def pgolf_contribute_calibration_weights(self, input_ids, ctx):
        return torch.ones_like(input_ids, dtype=torch.float32)

    def pgolf_contribute_config_errors(self, ctx):
        return []


class ConfiguresNothing(Technique):
    """Its configure runs but leaves the recipe as it was."""

    name = "configures_nothing"
    stage = "train"

    def pgolf_configure(self, ctx):
        ctx.recipe.optim.matrix_lr = ctx.recipe.optim.matrix_lr


class ConfiguresTheHost(Technique):
    """Acts by configuring the host alone (as XSA sets a model field)."""

    name = "configures_the_host"
    stage = "train"

    def pgolf_configure(self, ctx):
        ctx.recipe.optim.matrix_lr *= 0.5


@pytest.mark.parametrize("cls", [CalibrationWeightsOnly, ConfiguresNothing], ids=lambda c: c.name)
def test_a_technique_that_never_acts_fails_the_run(cls, micro_recipe, tmp_path):
    with pytest.raises(RegistryError, match=f"{cls.name} never acted"):
        run(micro_recipe(techniques={f"{M}:{cls.__name__}": {}}), tmp_path, QUIET)
    assert "never acted" in json.loads((tmp_path / "result.json").read_text())["error"]
    with pytest.raises(AssertionError, match=f"'{cls.name}' never acted"):
        assert_fired(tmp_path, cls.name)


def test_a_technique_that_configures_the_host_acts(micro_recipe, tmp_path):
    result = run(micro_recipe(techniques={f"{M}:ConfiguresTheHost": {}}), tmp_path, QUIET)
    assert result["valid"], result["failed_audits"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["configured_recipe"] == ["configures_the_host"]
    assert assert_fired(tmp_path, "configures_the_host") == {"pgolf_configure": 1}
    with pytest.raises(AssertionError, match="pgolf_on_step_end never fired"):
        assert_fired(tmp_path, "configures_the_host", hooks=["pgolf_on_step_end"])
    with pytest.raises(AssertionError, match="'ema' is not enabled"):
        assert_fired(tmp_path, "ema")
    with pytest.raises(AssertionError, match="not pgolf hooks: pgolf_on_stepend"):
        assert_fired(tmp_path, "configures_the_host", hooks=["on_stepend"])

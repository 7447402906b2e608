"""Test a technique in real pgolf runs without knowing the host: micro recipes, quiet runs, fired checks.

pgolf's own tests and a third-party technique package's tests use the same few helpers, so a
package tests its technique through the public surface (`pgolf.api` for the technique, this
module for its tests) and keeps working when the host's internals move::

    from pgolf.testing import assert_fired, micro_recipe, tiny_run

    def test_it_acts(tmp_path):
        result = tiny_run(micro_recipe(techniques={"my_technique": {"rate": 0.5}}), tmp_path)
        assert result["valid"]
        assert_fired(tmp_path, "my_technique", hooks=["pgolf_on_export_start"])

A micro run (the embedded corpus, 2 layers of width 64, 3 steps) takes seconds on a CPU.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgolf.api import Technique
    from pgolf.recipe import Recipe

__all__ = ["MICRO", "TinyRun", "assert_fired", "installed_techniques", "load_technique", "micro_recipe", "tiny_run"]

# A run small enough for a unit test (seconds on 2 CPU cores), applied on top of `--scale tiny`.
MICRO: list[str] = [
    "model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
    "train.seq_len=64", "train.batch_tokens=1024", "train.warmup_steps=1", "train.iterations=3",
    "train.max_wallclock_seconds=0", "train.log_every=1", "eval.batch_tokens=4096", "eval.max_tokens=4097",
    "eval.audit_positions=4", "export.keep_float_max_numel=1024",
]


def micro_recipe(*overrides: str, techniques: Mapping[str, Any] | None = None,
                 recipe: str | Path | None = None) -> Recipe:
    """A micro-sized recipe: `recipe` (default: the baseline) + tiny scale + `MICRO` + `overrides`.

    `techniques` (recipe name -> parameters) are merged in after the overrides, because names such
    as ``"module:Class"`` cannot be written as dotted ``key=value`` overrides.
    """
    from pgolf.recipe import RECIPES_DIR, load_recipe

    r = load_recipe(recipe if recipe is not None else RECIPES_DIR / "baseline.yaml", [*MICRO, *overrides],
                    scale="tiny")
    r.techniques.update({name: dict(params or {}) for name, params in (techniques or {}).items()})
    return r


class TinyRun(dict):  # type: ignore[type-arg]
    """result.json's content, plus the run's manifest (hooks fired), so a run in a temporary
    directory can still be checked with `assert_fired` after the directory is gone."""

    run_dir: Path | None
    manifest: dict[str, Any]


def tiny_run(recipe: Recipe, out_dir: str | Path | None = None) -> TinyRun:
    """Run every stage of `recipe` quietly (`pgolf.host.run`) and return the result.

    With no `out_dir` the run directory is temporary and removed afterwards; pass one to inspect
    its files. A run in which an enabled technique never acted raises, as `pgolf run` does.
    """
    from pgolf.host import run
    from pgolf.reporter import Reporter

    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="pgolf-tiny-run-") as tmp:
            result = tiny_run(recipe, tmp)
        result.run_dir = None
        return result
    out = Path(out_dir)
    result = TinyRun(run(recipe, out, Reporter(quiet=True)))
    result.run_dir = out
    result.manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return result


def installed_techniques() -> list[str]:
    """Every technique name a recipe can use here: the built-ins and installed packages' entry points."""
    from pgolf.registry import known_names

    return known_names()


def load_technique(name: str, params: Mapping[str, Any] | None = None) -> Technique:
    """The technique a recipe's ``techniques: {name: params}`` enables, its config validated as a
    run validates it (a bad parameter raises `pgolf.api.ConfigError`)."""
    from pgolf.registry import resolve

    (enabled,) = resolve({name: dict(params or {})})
    return enabled.instance


def _manifest(result_or_run_dir: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(result_or_run_dir, (str, Path)):
        path = Path(result_or_run_dir) / "manifest.json"
        if not path.is_file():
            raise AssertionError(f"{path} does not exist: pass a run directory written by a pgolf run")
        return json.loads(path.read_text(encoding="utf-8"))
    manifest = getattr(result_or_run_dir, "manifest", None)
    if manifest is None:
        raise TypeError("assert_fired needs a run directory or the result tiny_run returned "
                        "(a plain result.json dict holds no hook trace)")
    return manifest


def assert_fired(result_or_run_dir: Mapping[str, Any] | str | Path, technique_name: str,
                 hooks: Iterable[str] | None = None) -> dict[str, int]:
    """Fail unless `technique_name` acted in the run: each hook in `hooks` fired, or, with no
    `hooks`, a hook of its declared stage (or a later one) fired or its configure changed the recipe
    (the host's own rule; a hook that only ran at configure time did nothing to the result).

    Reads the run's manifest.json trace; returns the technique's calls per hook. A test that only
    compares scores passes when a technique silently does nothing, which this check catches.
    """
    from pgolf.hookspecs import HOOK_STAGES
    from pgolf.registry import Trace

    manifest = _manifest(result_or_run_dir)
    enabled = {t["name"]: t for t in manifest.get("techniques", [])}
    if technique_name not in enabled:
        raise AssertionError(f"technique '{technique_name}' is not enabled in this run "
                             f"(enabled: {', '.join(sorted(enabled)) or 'none'})")
    calls = {hook: int(s["calls"]) for hook, s in manifest.get("trace", {}).get(technique_name, {}).items()}
    fired = ", ".join(f"{h} x{n}" for h, n in sorted(calls.items()) if n) or "no hook at all"
    if hooks is not None:
        wanted = [h if h.startswith("pgolf_") else f"pgolf_{h}" for h in hooks]
        unknown = [h for h in wanted if h not in HOOK_STAGES]
        if unknown:
            raise AssertionError(f"not pgolf hooks: {', '.join(unknown)} (see pgolf/hookspecs.py)")
        silent = [h for h in wanted if not calls.get(h)]
        if silent:
            raise AssertionError(f"technique '{technique_name}': {', '.join(silent)} never fired in this run "
                                 f"(fired: {fired})")
        return calls
    trace = Trace()
    trace.merge(manifest.get("trace", {}))
    trace.configured = set(manifest.get("configured_recipe", []))
    stage = enabled[technique_name]["stage"]
    if not trace.acted(technique_name, stage):
        raise AssertionError(f"technique '{technique_name}' never acted in this run: no hook of its stage "
                             f"'{stage}' or a later one fired and its pgolf_configure changed nothing "
                             f"(fired: {fired})")
    return calls

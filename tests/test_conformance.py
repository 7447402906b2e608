"""Every registered technique passes the same table: a micro run completes, the technique acts (a
hook of its declared stage or a later one fires, or its configure changes the recipe: the host's
rule, so a technique whose hooks all fire too early fails here), the artifact round-trips to the
same score, and its config round-trips through the recipe."""

from __future__ import annotations

import json

import pytest

from pgolf.config import Provenance, to_plain
from pgolf.host import evaluate_target, run
from pgolf.registry import (
    Trace,
    check_declared_stages,
    describe,
    known_names,
    load_technique_class,
    resolve,
    silent_techniques,
)
from pgolf.reporter import Reporter
from tests.conformance_settings import micro_cases, settings_for, techniques_for

QUIET = Reporter(quiet=True)
TECHNIQUES = known_names()


@pytest.mark.parametrize("name", TECHNIQUES)
def test_metadata_is_complete(name):
    cls = load_technique_class(name)
    info = describe(cls)
    assert cls.name == name and cls.summary, "name and summary are required"
    assert info["stage"] in ("train", "export", "eval")
    assert info["hooks"], "a technique implements at least one hook"
    for other in (*cls.requires, *cls.conflicts, *cls.after, *cls.before):
        assert isinstance(other, str) and other != name


@pytest.mark.parametrize(("name", "variant"), micro_cases(TECHNIQUES),
                         ids=[f"{n}[{v}]" if v else n for n, v in micro_cases(TECHNIQUES)])
def test_no_hook_changes_a_stage_before_the_declared_one(name, variant):
    check_declared_stages(resolve(techniques_for(name, variant)), Provenance())


@pytest.mark.parametrize("name", TECHNIQUES)
def test_config_round_trips_through_a_recipe(name):
    techniques = techniques_for(name)
    (enabled,) = [e for e in resolve(techniques) if e.name == name]
    techniques[name] = json.loads(json.dumps(to_plain(enabled.instance.config)))
    (again,) = [e for e in resolve(techniques) if e.name == name]
    assert again.instance.config == enabled.instance.config


@pytest.mark.parametrize(("name", "variant"), micro_cases(TECHNIQUES),
                         ids=[f"{n}[{v}]" if v else n for n, v in micro_cases(TECHNIQUES)])
def test_micro_run_acts_and_round_trips(name, variant, micro_recipe, tmp_path):
    s = settings_for(name, variant)
    recipe = micro_recipe(*s["overrides"], techniques=techniques_for(name, variant))
    result = run(recipe, tmp_path, QUIET)  # raises when an enabled technique never acted
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    trace = Trace()
    trace.merge(manifest["trace"])
    trace.configured = set(manifest["configured_recipe"])
    enabled = resolve(techniques_for(name, variant))
    assert [t["stage"] for t in manifest["techniques"]] == [e.stage for e in enabled]
    assert silent_techniques(enabled, trace) == [], manifest["trace"].get(name, {})
    failed = set(result["failed_audits"])
    assert failed == s["invalid_audits"], result["compliance"]
    again = evaluate_target(tmp_path, log=lambda m: None)
    assert again["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9, abs=1e-12)

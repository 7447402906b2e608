"""The registry: discovery, config validation, ordering, conflicts, providers, tracing, no-ops, stages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pgolf.api import RunContext, Technique, hookimpl
from pgolf.config import Provenance
from pgolf.errors import ConfigError, RegistryError
from pgolf.recipe import Recipe
from pgolf.registry import Trace, build_plugin_manager, check_declared_stages, resolve, silent_techniques

M = "tests.test_registry"


class Recorder(Technique):
    calls: list[str] = []

    def pgolf_configure(self, ctx):
        Recorder.calls.append(self.name)


class Alpha(Recorder):
    name = "alpha"
    summary = "first"


class Beta(Recorder):
    name = "beta"
    summary = "after alpha"
    after = ("alpha",)


class Gamma(Recorder):
    name = "gamma"
    summary = "before alpha"
    before = ("alpha",)


class CycleA(Technique):
    name = "cycle_a"
    after = ("cycle_b",)


class CycleB(Technique):
    name = "cycle_b"
    after = ("cycle_a",)


class Needy(Technique):
    name = "needy"
    requires = ("alpha",)


class Jealous(Technique):
    name = "jealous"
    conflicts = ("alpha",)


class ProviderOne(Technique):
    name = "provider_one"

    def pgolf_provide_scorer(self, ctx):
        return "one"


class ProviderTwo(Technique):
    name = "provider_two"

    def pgolf_provide_scorer(self, ctx):
        return "two"


@dataclass
class KnobConfig:
    rate: float = 0.5
    mode: str = "a"


class Knob(Technique):
    name = "knob"
    Config = KnobConfig


class Typo(Technique):
    name = "typo"

    def pgolf_on_stepend(self, model, ctx):  # misspelled hook name
        pass


class Quiet(Technique):
    name = "quiet"

    def pgolf_on_scores(self, scores, ctx):
        pass


class Configurer(Technique):
    """Acts by configuring the host alone (as XSA sets a model field)."""

    name = "configurer"

    def pgolf_configure(self, ctx):
        ctx.recipe.train.log_every += 1


class EarlyHook(Technique):
    """Declares eval but changes training: an ablation would reuse a checkpoint made without it."""

    name = "early_hook"
    stage = "eval"

    def pgolf_on_step_end(self, model, ctx):
        pass


class EarlyContribution(Technique):
    """Declares eval with a training contribute hook: allowed (it may return None), but never its act."""

    name = "early_contribution"
    stage = "eval"

    def pgolf_contribute_loss_weights(self, ctx):
        return None


class Wrapped(Technique):
    name = "wrapped"

    @hookimpl(wrapper=True)
    def pgolf_provide_scorer(self, ctx):
        inner = yield
        return f"wrapped({inner})"


def names(enabled):
    return [e.name for e in enabled]


def context():
    return RunContext(recipe=Recipe(), device=torch.device("cpu"))


def test_order_follows_declarations_not_recipe_order():
    forward = resolve({f"{M}:Alpha": {}, f"{M}:Beta": {}, f"{M}:Gamma": {}})
    backward = resolve({f"{M}:Beta": {}, f"{M}:Gamma": {}, f"{M}:Alpha": {}})
    assert names(forward) == names(backward) == ["gamma", "alpha", "beta"]


def test_pluggy_calls_follow_the_resolved_order():
    enabled = resolve({f"{M}:Beta": {}, f"{M}:Alpha": {}, f"{M}:Gamma": {}})
    pm = build_plugin_manager(enabled, None, Trace())
    Recorder.calls = []
    pm.hook.pgolf_configure(ctx=context())
    assert Recorder.calls == ["gamma", "alpha", "beta"]


def test_cycle_names_both():
    with pytest.raises(RegistryError, match="cycle_a, cycle_b form an ordering cycle"):
        resolve({f"{M}:CycleA": {}, f"{M}:CycleB": {}})


def test_missing_requirement_names_both():
    with pytest.raises(ConfigError, match="'needy' requires 'alpha'"):
        resolve({f"{M}:Needy": {}})
    assert names(resolve({f"{M}:Needy": {}, f"{M}:Alpha": {}})) == ["alpha", "needy"]


def test_conflict_names_both():
    with pytest.raises(ConfigError, match="'jealous' and 'alpha' conflict"):
        resolve({f"{M}:Jealous": {}, f"{M}:Alpha": {}})


def test_two_providers_of_one_object_fail_before_the_run():
    with pytest.raises(RegistryError, match="provider_one and provider_two both provide 'pgolf_provide_scorer'"):
        resolve({f"{M}:ProviderOne": {}, f"{M}:ProviderTwo": {}})


def test_unknown_technique_suggests_the_nearest_name(monkeypatch):
    import pgolf_plugins

    monkeypatch.setattr(pgolf_plugins, "BUILTINS", {"sliding_window": f"{M}:Alpha"})
    with pytest.raises(ConfigError, match=r"unknown technique 'sliding_windw'.*Did you mean 'sliding_window'"):
        resolve({"sliding_windw": {}})
    assert names(resolve({"sliding_window": {}})) == ["alpha"]


def test_config_is_validated_against_the_dataclass():
    (e,) = resolve({f"{M}:Knob": {"rate": 2}})
    assert e.instance.config == KnobConfig(rate=2.0)
    prov = Provenance({f"techniques.{M}:Knob.rat": ("r.yaml", 9)}, default_file="r.yaml")
    with pytest.raises(ConfigError, match=r"r.yaml, line 9.*unknown key 'rat'.*Did you mean 'rate'"):
        resolve({f"{M}:Knob": {"rat": 1}}, prov)


def test_a_non_technique_target_is_rejected():
    with pytest.raises(ConfigError, match="does not name a pgolf Technique"):
        resolve({f"{M}:KnobConfig": {}})


def test_misspelled_hook_is_an_error_not_a_silent_no_op():
    enabled = resolve({f"{M}:Typo": {}})
    with pytest.raises(RegistryError, match="pgolf_on_stepend"):
        build_plugin_manager(enabled, None, Trace())


def test_trace_counts_calls_and_time_per_technique():
    trace = Trace()
    enabled = resolve({f"{M}:Alpha": {}, f"{M}:Quiet": {}, f"{M}:Configurer": {}})
    pm = build_plugin_manager(enabled, None, trace)
    ctx = context()
    pm.hook.pgolf_configure(ctx=ctx)
    pm.hook.pgolf_configure(ctx=ctx)
    assert trace.to_dict()["alpha"]["pgolf_configure"]["calls"] == 2
    assert trace.to_dict()["alpha"]["pgolf_configure"]["seconds"] >= 0.0
    # alpha's configure fired twice but changed nothing: calls are not acts; configurer's changed the recipe
    assert trace.configured == {"configurer"}
    assert silent_techniques(enabled, trace) == ["alpha", "quiet"]
    pm.hook.pgolf_on_scores(scores=None, ctx=ctx)
    assert silent_techniques(enabled, trace) == ["alpha"]


@pytest.mark.parametrize(("stage", "hook", "acted"), [
    ("train", "pgolf_on_step_end", True),
    ("train", "pgolf_on_scores", True),  # a later stage's hook counts
    ("export", "pgolf_on_export_start", True),
    ("export", "pgolf_contribute_loss_weights", False),  # an earlier stage's hook fired: not the declared act
    ("export", "pgolf_contribute_train_reserve_seconds", False),
    ("eval", "pgolf_quantize_tensor", False),
    ("train", "pgolf_configure", False),  # configure that changed nothing
    ("train", "pgolf_contribute_config_errors", False),
    ("eval", "pgolf_contribute_metrics", False),  # reporting is not acting
])
def test_acting_means_a_hook_of_the_declared_stage_or_later(stage, hook, acted):
    trace = Trace()
    trace.record("t", hook, 0.0)
    assert trace.acted("t", stage) is acted
    trace.configured.add("t")
    assert trace.acted("t", stage)


def test_a_hook_of_a_stage_before_the_declared_one_is_refused():
    with pytest.raises(ConfigError, match="declares stage 'eval' but implements pgolf_on_step_end"):
        check_declared_stages(resolve({f"{M}:EarlyHook": {}}), Provenance())
    check_declared_stages(resolve({f"{M}:EarlyContribution": {}}), Provenance())  # contribute hooks may be early


def test_wrappers_are_traced_and_wrap_the_host_default():
    class Host:
        @hookimpl(trylast=True)
        def pgolf_provide_scorer(self, ctx):
            return "host"

    trace = Trace()
    pm = build_plugin_manager(resolve({f"{M}:Wrapped": {}}), Host(), trace)
    assert pm.hook.pgolf_provide_scorer(ctx=None) == "wrapped(host)"
    assert trace.calls("wrapped") == 1 and trace.calls("host") == 1


def test_a_wrapper_is_not_a_second_provider():
    assert names(resolve({f"{M}:ProviderOne": {}, f"{M}:Wrapped": {}})) == ["provider_one", "wrapped"]

"""The export techniques together: one declared order whatever the recipe's order, and a technique
toggled off leaves the artifact exactly as if it had never been named."""

from __future__ import annotations

import itertools

import pytest

from pgolf.host import Session
from pgolf.registry import resolve
from tests.micro_training import QUIET, export_with, stored_tensors, train_micro

STACK = {
    "sandwich_quant": {"outer_layers": 1, "embed_bits": 7},
    "freq_weighting": {"top_k": 16},
    "sdclip": {},
    "gptq": {"calibration_batches": 2},
}


@pytest.fixture(scope="module")
def trained():
    return train_micro()


def test_declared_order_whatever_the_recipe_order():
    names = [*STACK, "codec"]
    orders = {tuple(e.name for e in resolve({n: {} for n in perm})) for perm in itertools.permutations(names)}
    assert orders == {("codec", "sandwich_quant", "freq_weighting", "sdclip", "gptq")}


@pytest.mark.parametrize("subset", [("sandwich_quant", "sdclip"), ("sdclip", "freq_weighting", "sandwich_quant")])
def test_both_recipe_orders_give_identical_specs_and_artifacts(micro_recipe, trained, subset):
    forward = {name: STACK[name] for name in subset}
    backward = {name: STACK[name] for name in reversed(subset)}
    s1, a = export_with(micro_recipe(techniques=forward), trained)
    s2, b = export_with(micro_recipe(techniques=backward), trained)
    assert list(s1.recipe.techniques) != list(s2.recipe.techniques)
    assert a.info["quant_notes"] == b.info["quant_notes"] and a.info["bits"] == b.info["bits"]
    assert stored_tensors(a.blob) == stored_tensors(b.blob)
    notes = a.info["quant_notes"]["tok_emb.weight"]
    if "freq_weighting" in subset:  # sandwich sets int7, frequency rows then split it, SDClip clips last
        assert [n.split(":")[0] for n in notes] == ["sandwich_quant", "freq_weighting", "sdclip"]
    else:
        assert notes == ["sandwich_quant: int7 (embed)", "sdclip: k=15"]


def test_the_whole_stack_in_both_orders_including_gptq(micro_recipe, trained):
    _, a = export_with(micro_recipe(techniques=STACK), trained)
    _, b = export_with(micro_recipe(techniques=dict(reversed(list(STACK.items())))), trained)
    assert stored_tensors(a.blob) == stored_tensors(b.blob)


def test_a_technique_toggled_off_is_bit_identical_to_never_naming_it(micro_recipe, trained):
    _, never = export_with(micro_recipe(), trained)
    _, stacked = export_with(micro_recipe(techniques={**STACK, "codec": {}}), trained)  # leaves no global state
    assert stored_tensors(stacked.blob) != stored_tensors(never.blob)
    _, again = export_with(micro_recipe(), trained)
    assert stored_tensors(again.blob) == stored_tensors(never.blob)
    assert again.blob[4:6] == never.blob[4:6]  # same codec and shuffle bytes
    _, off = export_with(micro_recipe("techniques.sdclip=false", "techniques.codec=false"), trained)
    assert stored_tensors(off.blob) == stored_tensors(never.blob) and off.blob[4:6] == never.blob[4:6]


def test_toggling_one_technique_off_the_stack_equals_the_stack_without_it(micro_recipe, trained):
    without = {k: v for k, v in STACK.items() if k != "sandwich_quant"}
    _, a = export_with(micro_recipe(techniques=without), trained)
    _, b = export_with(micro_recipe("techniques.sandwich_quant=false", techniques=without), trained)
    assert stored_tensors(a.blob) == stored_tensors(b.blob)
    session = Session(micro_recipe(techniques=without), reporter=QUIET)
    assert [e.name for e in session.enabled] == ["freq_weighting", "sdclip", "gptq"]

"""torch.compile (inductor) and bf16 autocast on CPU: the CUDA training path, checked without a GPU.

On CUDA pgolf trains the module `pgolf.host.compile_and_wrap` returns (`torch.compile(model,
dynamic=False, fullgraph=True)`) under bf16 autocast, and depth recurrence switches to graphs
that the warmup primed. Inductor compiles for the CPU as well (it emits C++, so it needs a
compiler) and CPU autocast does bf16, slowly, so every model a technique builds is checked here
the way a GPU run uses it:

* compiled and eager give the same loss and gradients on the same batch, in every graph the
  training loop warms and switches to, and switching compiles nothing the warmup did not;
* under bf16 autocast the loss stays near the float32 loss and the gradients are finite;
* a whole micro run with `train.compile: on` completes, is valid and scores as the eager run.

Every model is built through the host (`Session`, `new_model`): the baseline, each technique that
changes the model alone (with its micro settings from tests/conformance_settings.py), and the
record stack of recipes/best.yaml. Compiling is the cost: from cold caches the file takes about
3.5 minutes on 2 shared cores (the first model ~30 s, each later one 5-15 s as it reuses most
kernels, the looped models ~30 s for their 2-3 graphs), and about 25 s with inductor's cache warm.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

from pgolf.data.dataset import DistributedTokenLoader
from pgolf.host import Session, compile_and_wrap, load_data, loop_hooks, new_model
from pgolf.recipe import RECIPES_DIR, Recipe
from pgolf.registry import load_technique_class
from pgolf.reporter import Reporter
from pgolf.runtime import seed_everything
from pgolf.testing import micro_recipe, tiny_run
from pgolf_plugins import BUILTINS
from tests.conformance_settings import settings_for, techniques_for

QUIET = Reporter(quiet=True)
COMPILE_ON = "train.compile='on'"  # quoted: YAML reads a bare on/off as a boolean

# Inductor fuses kernels, reorders float32 reductions (softmax, RMSNorm, cross-entropy, the weight
# gradients' sums over the batch) and evaluates exp, tanh and cos with its own vectorised code, each
# a few float32 ulps (2^-23 ~ 1.2e-7) from eager's. A gradient that cancels to almost nothing (the
# stack's second q_gain: 9e-6 where the model's largest entry is 7e-2) keeps the absolute error of
# the sums it cancels from, so each tensor is measured against at least 1% of the model's largest
# gradient entry. Observed at micro size: loss <= 1.4e-7 relative, gradients <= 2e-5. Miscompiled on
# purpose, the checks fail by far: XSA skipped in the compiled graph moves a gradient by 0.74 (the loss
# by 2.3e-4), SmearGate's BOS mask lost by 2.4e-2 (the loss by only 3e-7: gradients are the sharp test).
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
GRAD_FLOOR = 0.01
# bf16 keeps 8 significant bits (unit roundoff u = 2^-8 ~ 3.9e-3): autocast rounds every matmul's
# inputs and outputs to it. Each logit moves by a few u of itself, and the mean over 1,024 tokens'
# float32 cross-entropies averages most of that out: the loss stays within one bf16 rounding of
# itself (observed <= 3e-5 relative). The gradient as a whole keeps its direction: 1 - cosine is
# about half the squared relative error, and 0.999 allows 4.5% (about 11 u; observed >= 0.99995).
BF16_LOSS_RTOL = 2.0**-8
BF16_GRAD_COSINE = 0.999
# A whole run: three Muon steps carry the per-step differences above into the weights, and int8/int6
# rounding can flip a few near a step boundary. Observed: <= 1.3e-6 bpb (the stack), 6e-11 (the
# baseline); the records' technique effects are 1e-3 bpb and up.
RUN_BPB_ATOL = 1e-4

# MICRO has 2 layers and 64-token windows: the record stack's loop and lanes fit inside them (as in
# tests/test_cli.py). TTT is left out: evaluation never runs the compiled module, and phased TTT
# alone takes most of a micro run's time.
BEST_FIT = ["techniques.recurrence.loop_start=0", "techniques.recurrence.loop_end=0",
            "techniques.parallel_residuals.start_layer=1", "techniques.gptq.calibration_batches=2",
            "techniques.ttt=false"]
# The built-in techniques that change what the training loop runs (test_the_model_techniques checks
# the list), and the mode in which one does: freq_weighting weights the training loss in mode `loss`.
MODEL_TECHNIQUES = ["asym_logit", "attn_out_gate", "bigram_hash", "doc_isolation", "freq_weighting", "gated_attn",
                    "leaky_relu", "orthogonal_init", "parallel_residuals", "partial_rope", "qk_gain", "recurrence",
                    "skip_gates", "smear_gate", "sparse_attn_gate", "xsa"]
MODEL_MODES = {"freq_weighting": {"mode": "loss"}}
MODEL_HOOKS = {"pgolf_provide_model", "pgolf_on_model_built", "pgolf_contribute_loss_weights"}


def alone(name: str, *overrides: str) -> Recipe:
    """The baseline micro recipe with one technique, at its micro settings and model-changing mode."""
    techniques = techniques_for(name)
    techniques[name] = {**techniques[name], **MODEL_MODES.get(name, {})}
    return micro_recipe(*settings_for(name)["overrides"], *overrides, techniques=techniques)


def best(*overrides: str) -> Recipe:
    """recipes/best.yaml at tiny scale, MICRO-sized, without TTT."""
    return micro_recipe(*BEST_FIT, *overrides, recipe=RECIPES_DIR / "best.yaml")


CASES: dict[str, Callable[..., Recipe]] = {
    "baseline": micro_recipe,
    **{name: functools.partial(alone, name) for name in MODEL_TECHNIQUES},
    # the records' other parallel-residual form (#1412, #1493): both branches summed in one lane
    "parallel_residuals-sum": functools.partial(
        micro_recipe, techniques={"parallel_residuals": {"start_layer": 1, "variant": "sum"}}),
    "best": best,
}


def changes_the_model(name: str) -> bool:
    """Whether a technique changes what the loop trains: the recipe's model section at configure,
    the module once it is built, or the training loss's weights."""
    if MODEL_HOOKS & set(load_technique_class(name).hook_names()):
        return True
    plain = Session(micro_recipe(*settings_for(name)["overrides"]), reporter=QUIET).recipe.model
    return Session(alone(name), reporter=QUIET).recipe.model != plain


def test_the_model_techniques():
    """Every built-in technique that changes the model has its cases below (a new one must be added)."""
    assert sorted(name for name in BUILTINS if changes_the_model(name)) == MODEL_TECHNIQUES


# --- building and running a case -----------------------------------------------------------------


@dataclass
class Case:
    session: Session
    model: nn.Module
    inputs: Tensor
    targets: Tensor


def build(recipe: Recipe) -> Case:
    """The model the training loop would get (through the host), moved off its init, and one training batch."""
    session = Session(recipe, reporter=QUIET)
    load_data(session)
    seed_everything(recipe.seed)
    model = new_model(session)
    weights = [w for w in session.hook.pgolf_contribute_loss_weights(ctx=session.ctx) if w is not None]
    if weights:  # as train_stage: per-token weights are part of the training loss
        model.loss_weights = torch.stack([w.float() for w in weights]).prod(0)
    spread(model)
    loader = DistributedTokenLoader(session.data.train_stream(), 0, 1, session.device)
    inputs, targets = loader.next_batch(recipe.train.batch_tokens, recipe.train.seq_len, 1)
    return Case(session, model, inputs, targets)


def spread(model: nn.Module) -> None:
    """Move every weight off its init: zero projections, the identity SmearGate and unit scales would
    leave much of the graph with exactly zero gradient, where a wrong kernel could hide."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def loss_and_grads(forward: Callable[[Tensor, Tensor], Tensor], case: Case, bf16: bool = False
                   ) -> tuple[float, dict[str, Tensor]]:
    """One training step's loss and gradients, the forward under bf16 autocast if asked (as the loop)."""
    case.model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = forward(case.inputs, case.targets)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in case.model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def loop_states(case: Case) -> Iterator[str]:
    """Put the model into each graph the training loop runs, in the loop's order: the plain one, each
    warmup phase techniques contribute (entered, then left), then whatever the step hooks switch on
    as the clock runs from the first step to the last (step-matched: frac = step / iterations)."""
    session, model = case.session, case.model
    hooks = loop_hooks(session)
    yield "plain"
    for phase in hooks.warmup_phases(model):
        phase.enter()
        yield f"warmup {phase.name}"
        phase.exit()
    hooks.train_start(model)
    clock, iterations = session.ctx.clock, session.recipe.train.iterations
    for step in range(iterations):
        clock.step, clock.frac = step, step / iterations
        hooks.step_start(model)
        yield f"step {step}"


def layer_plan(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    encoder, decoder = model.layer_plan()
    return tuple(encoder), tuple(decoder)


def compiled_graphs() -> int:
    """Graphs dynamo has produced in this process (each compile or recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def differences(got: tuple[float, dict[str, Tensor]], want: tuple[float, dict[str, Tensor]]
                ) -> tuple[float, dict[str, float]]:
    """(relative loss difference, per tensor max |difference| / max(max |want|, GRAD_FLOOR * the model's
    largest entry)); both sides must have gradients for the same parameters."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys()
    floor = GRAD_FLOOR * max(float(g.abs().max()) for g in ref_grads.values())
    return abs(loss - ref_loss) / abs(ref_loss), {
        n: float((grads[n] - g).abs().max()) / max(float(g.abs().max()), floor) for n, g in ref_grads.items()}


def gradient_cosine(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Cosine between two whole-model gradients."""
    flat_a, flat_b = (torch.cat([g[n].double().flatten() for n in sorted(a)]) for g in (a, b))
    return float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0))


@pytest.fixture
def inductor() -> Iterator[None]:
    """Skip where inductor has no C++ compiler for CPU kernels; each test starts from empty graph caches."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler as exc:
        pytest.skip(f"inductor cannot compile CPU kernels on this machine: {exc}")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- compiled against eager ----------------------------------------------------------------------


# layer plans the loop runs: recurrence's plain order, one extra pass (its micro settings are
# progressive) and two; the record stack's plain order and its full loop
LAYER_PLANS = {"recurrence": 3, "best": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager_in_every_graph_the_loop_runs(name, inductor):
    case = build(CASES[name](COMPILE_ON))
    compiled = compile_and_wrap(case.session, case.model)
    assert compiled is not case.model
    start, plans, warmed = compiled_graphs(), set(), None
    for state in loop_states(case):
        if warmed is None and state.startswith("step"):
            warmed = compiled_graphs()
        got = loss_and_grads(compiled, case)  # compiled first: the loop never runs the module eagerly
        loss_diff, grad_diffs = differences(got, loss_and_grads(case.model, case))
        worst = max(grad_diffs, key=grad_diffs.__getitem__)
        assert loss_diff <= LOSS_RTOL, f"{name}, {state}: loss differs by {loss_diff:.2e} (relative)"
        assert grad_diffs[worst] <= GRAD_RTOL, f"{name}, {state}: {worst}'s gradient differs by {grad_diffs[worst]:.2e}"
        plans.add(layer_plan(case.model))
    # one graph per layer plan, every one of them compiled by the time warmup ends: the step hooks
    # switch to graphs already warm, and nothing recompiles inside the timed loop
    assert len(plans) == LAYER_PLANS.get(name, 1)
    assert compiled_graphs() - start == len(plans)
    assert compiled_graphs() == warmed


@pytest.mark.slow
def test_compiled_bf16_matches_eager_bf16_on_the_record_stack(inductor):
    """The CUDA path itself: the compiled record stack under bf16 autocast, in every graph. Inductor keeps
    fused intermediates in float32 where eager rounds each op to bf16: the bound of bf16 against float32."""
    case = build(best(COMPILE_ON))
    compiled = compile_and_wrap(case.session, case.model)
    for state in loop_states(case):
        loss, grads = loss_and_grads(compiled, case, bf16=True)
        ref_loss, ref_grads = loss_and_grads(case.model, case, bf16=True)
        assert abs(loss - ref_loss) <= BF16_LOSS_RTOL * ref_loss, f"{state}: {loss} vs {ref_loss}"
        assert all(bool(g.isfinite().all()) for g in grads.values()), state
        assert gradient_cosine(grads, ref_grads) >= BF16_GRAD_COSINE, state


# --- bf16 autocast -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_stays_near_float32(name):
    case = build(CASES[name]())
    for state in loop_states(case):
        loss32, grads32 = loss_and_grads(case.model, case)
        loss16, grads16 = loss_and_grads(case.model, case, bf16=True)
        assert abs(loss16 - loss32) <= BF16_LOSS_RTOL * loss32, f"{name}, {state}: {loss16} vs {loss32}"
        assert grads16 and all(bool(g.isfinite().all()) for g in grads16.values()), f"{name}, {state}"
        assert gradient_cosine(grads16, grads32) >= BF16_GRAD_COSINE, f"{name}, {state}"


# --- whole runs ----------------------------------------------------------------------------------


# graphs a compiled micro run builds: the plain one, plus the looped one recurrence's warmup phase adds
RUN_GRAPHS = {"baseline": 1, "best": 2}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUN_GRAPHS))
def test_a_compiled_training_run_scores_as_the_eager_one(name, inductor):
    recipe = CASES[name]
    eager = tiny_run(recipe("train.compile='off'"))
    start = compiled_graphs()
    compiled = tiny_run(recipe(COMPILE_ON))
    assert compiled_graphs() - start == RUN_GRAPHS[name]  # compiled, and only in the warmup
    assert eager["valid"] and compiled["valid"] and compiled["steps"] == eager["steps"] == 3
    for key in ("val_bpb_prequant", "val_bpb"):
        assert math.isfinite(compiled[key]) and abs(compiled[key] - eager[key]) <= RUN_BPB_ATOL, \
            f"{key}: compiled {compiled[key]} vs eager {eager[key]}"

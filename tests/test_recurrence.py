"""Depth recurrence: the records' index lists, weight sharing, the activation switch, and the
structure surviving an artifact round trip."""

from __future__ import annotations

import copy

import pytest
import torch

from pgolf.api import Technique
from pgolf.errors import ConfigError
from pgolf.host import Session, eval_stage, evaluate_target, load_data, run, session_from_artifact
from pgolf.model import GPT
from pgolf.products import Artifact
from pgolf.recipe import ModelConfig
from pgolf.registry import resolve
from pgolf.reporter import Reporter
from pgolf_plugins.recurrence import (
    LoopSwitch,
    Recurrence,
    RecurrenceConfig,
    RepeatedPass,
    activate,
    apply_recurrence,
    build_loop_indices,
    lane_order_problem,
    loop_lists,
    loop_schedule,
    set_loop_passes,
    skip_count,
    split_encoder_decoder,
    virtual_layers,
)
from tests.test_model import randomized

QUIET = Reporter(quiet=True)


def eleven(**kw) -> ModelConfig:
    """The records' 11-layer stack at toy width."""
    return ModelConfig(**{**dict(vocab_size=64, num_layers=11, model_dim=32, num_heads=4, num_kv_heads=2), **kw})


def looped(cfg: RecurrenceConfig, seed: int = 0, passes: int | None = None) -> GPT:
    model = randomized(eleven(), seed)
    apply_recurrence(model, cfg)
    activate(model, cfg, 0, cfg.num_loops if passes is None else passes)
    return model


TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


# --- the records' index lists ------------------------------------------------------------------


def test_loop_lists_match_the_records():
    enc, dec = build_loop_indices(11, 4, 5, 2)
    assert (enc, dec) == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert skip_count(enc, dec) == 7
    enc, dec = build_loop_indices(11, 3, 5, 2)
    assert (enc, dec) == ([0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10])
    assert skip_count(enc, dec) == 8


def test_pr1204_virtual_to_physical_map():
    v2p = virtual_layers(11, 4, 5, 1)  # RECUR_LAYERS=4,5: one extra pass
    assert v2p == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]
    enc, dec = split_encoder_decoder(v2p)
    assert (len(enc), len(dec)) == (6, 7)


def test_progressive_phase_one_lists_and_skips_sized_for_phase_two():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, enable_at=0.5, phase_at=[0.65])
    model = randomized(eleven())
    apply_recurrence(model, cfg)
    set_loop_passes(model, cfg, 1)
    assert model.layer_plan() == ([0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9, 10])
    set_loop_passes(model, cfg, 2)
    assert model.layer_plan() == ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])
    assert model.skip_weights.shape[0] == 7


def test_untied_passes_get_their_own_block_indices():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True)
    model = randomized(eleven())
    apply_recurrence(model, cfg)
    enc, dec = loop_lists(model, cfg, 2)
    assert enc + dec == [0, 1, 2, 3, 4, 5, 11, 12, 13, 14, 6, 7, 8, 9, 10]
    assert [(b.layer_idx, b.loop_pass) for b in model.extra_blocks] == [(4, 1), (5, 1), (4, 2), (5, 2)]


# --- weight sharing ----------------------------------------------------------------------------


def test_shared_loop_adds_only_the_extra_skip_weights():
    plain = randomized(eleven())
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2)
    model = randomized(eleven())
    apply_recurrence(model, cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in plain.parameters()) + (7 - 5) * 32
    activate(model, cfg, 0, 2)
    assert sum(p.numel() for p in model.parameters()) == count
    assert set(model.state_dict()) == set(plain.state_dict())


def test_untied_copies_equal_the_block_mlp_right_after_activation():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True)
    model = randomized(eleven())
    apply_recurrence(model, cfg)
    with torch.no_grad():
        for p in model.extra_blocks.parameters():
            p.normal_(0, 1.0)  # trained apart from their blocks, or never synced
    activate(model, cfg, 0, 1)
    for b in model.extra_blocks:
        same = all(torch.equal(a, c) for a, c in zip(b.mlp.parameters(), model.blocks[b.layer_idx].mlp.parameters(), strict=True))
        assert same == (b.loop_pass == 1), (b.layer_idx, b.loop_pass)
    sd = model.state_dict()
    assert "extra_blocks.0.mlp.fc.weight" in sd and not any(k.startswith("extra_blocks.0.attn") for k in sd)


def test_looping_off_is_the_plain_unet():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True)
    plain = randomized(eleven())
    model = copy.deepcopy(plain)
    apply_recurrence(model, cfg)
    assert not model.looping_active
    with torch.no_grad():
        torch.testing.assert_close(model.log_probs(TOKENS), plain.log_probs(TOKENS), rtol=0, atol=0)
        activate(model, cfg, 0, 2)
        assert not torch.allclose(model.log_probs(TOKENS), plain.log_probs(TOKENS))


@pytest.mark.parametrize("untie", [False, True])
def test_a_looped_block_runs_once_per_pass(untie):
    model = looped(RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=untie))
    calls = {i: 0 for i in range(11)}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        model(TOKENS, TOKENS)
    assert calls == {**{i: 1 for i in range(11)}, 4: 3, 5: 3}


def test_shared_gradient_is_the_sum_over_passes():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2)
    shared = looped(cfg)
    untied = GPT(eleven())
    apply_recurrence(untied, RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True))
    untied.load_state_dict(shared.state_dict(), strict=False)
    activate(untied, RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True), 0, 2)
    y = torch.randint(0, 64, TOKENS.shape, generator=torch.Generator().manual_seed(4))
    shared(TOKENS, y).backward()
    untied(TOKENS, y).backward()
    for layer in (4, 5):
        copies = [b for b in untied.extra_blocks if b.layer_idx == layer]
        for name in ("fc", "proj"):
            total = getattr(untied.blocks[layer].mlp, name).weight.grad.clone()
            for b in copies:
                total += getattr(b.mlp, name).weight.grad
            torch.testing.assert_close(getattr(shared.blocks[layer].mlp, name).weight.grad, total,
                                       rtol=1e-5, atol=1e-6)


def test_hessian_of_a_looped_layer_sums_over_passes():
    """What GPTQ calibration sees: hooks fire per pass, so H = sum over passes of X^T X."""

    def collect(modules: list[torch.nn.Module], model: GPT) -> list[torch.Tensor]:
        hessians = [torch.zeros(32, 32, dtype=torch.float64) for _ in modules]

        def hook(i: int):
            def add(mod, inp, out):
                x = inp[0].reshape(-1, inp[0].size(-1)).double()
                hessians[i] += x.T @ x
            return add

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
        with torch.no_grad():
            model(TOKENS, TOKENS)
        for h in handles:
            h.remove()
        return hessians

    shared = looped(RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2))
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=2, untie_mlp=True)
    untied = GPT(eleven())
    apply_recurrence(untied, cfg)
    untied.load_state_dict(shared.state_dict(), strict=False)
    activate(untied, cfg, 0, 2)
    (h_shared,) = collect([shared.blocks[4].mlp.fc], shared)
    per_pass = collect([untied.blocks[4].mlp.fc] + [b.mlp.fc for b in untied.extra_blocks if b.layer_idx == 4], untied)
    assert len(per_pass) == 3
    torch.testing.assert_close(h_shared, sum(per_pass), rtol=1e-9, atol=1e-9)


# --- the activation switch ---------------------------------------------------------------------


def test_switch_fires_at_the_first_step_past_the_threshold_and_stays_on():
    max_ms, reserve_ms, step_ms = 600_000.0, 12_000.0, 130.0
    switch = LoopSwitch(loop_schedule(RecurrenceConfig(enable_at=0.35)))
    fired = []
    for step in range(5000):
        frac = min(step * step_ms / (max_ms - reserve_ms), 1.0)  # the host's elapsed / (cap - reserve)
        if switch.advance(frac) is not None:
            fired.append((step, frac))
    (step, frac), = fired
    assert frac >= 0.35 and (step - 1) * step_ms / (max_ms - reserve_ms) < 0.35
    assert switch.advance(0.0) is None and switch.passes == 2  # never turns off


def test_progressive_switch_goes_one_pass_at_a_time():
    switch = LoopSwitch(loop_schedule(RecurrenceConfig(loop_start=4, loop_end=5, enable_at=0.5, phase_at=[0.65])))
    seen = [switch.advance(f / 100) for f in range(101)]
    assert [(f, p) for f, p in enumerate(seen) if p is not None] == [(50, 1), (65, 2)]
    jump = LoopSwitch(loop_schedule(RecurrenceConfig(num_loops=3, enable_at=0.2, phase_at=[0.3, 0.4])))
    assert jump.advance(0.45) == 3  # a late first step still lands on the right phase


def test_warmup_phases_switch_each_graph_on_and_back_off():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, enable_at=0.5, phase_at=[0.65])
    model = randomized(eleven())
    apply_recurrence(model, cfg)
    phases = Recurrence(cfg).pgolf_contribute_warmup_phases(model, ctx=None)
    plans = []
    for phase in phases:
        phase.enter()
        plans.append(model.layer_plan())
        phase.exit()
        assert not model.looping_active
    assert plans == [([0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9, 10]), ([0, 1, 2, 3, 4, 5, 4], [5, 4, 5, 6, 7, 8, 9, 10])]


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("params, key", [
    ({"loop_start": 5, "loop_end": 4}, "loop_end"),
    ({"num_loops": 0}, "num_loops"),
    ({"enable_at": 1.5}, "enable_at"),
    ({"num_loops": 2, "phase_at": [0.6, 0.7]}, "phase_at"),
    ({"enable_at": 0.5, "phase_at": [0.4]}, "phase_at"),
])
def test_bad_settings_name_their_key(params, key):
    with pytest.raises(ConfigError, match=f"techniques.recurrence.{key}"):
        resolve({"recurrence": params})


def test_a_loop_outside_the_model_fails_before_the_run(micro_recipe):
    with pytest.raises(ConfigError, match="loops blocks 3..5 but the model has 2 layers"):
        Session(micro_recipe("techniques.recurrence={}"), reporter=QUIET)


# --- lifecycle ---------------------------------------------------------------------------------


class DecodedModel(Technique):
    """Keeps the model the eval stage decoded from the artifact, as recurrence left it."""

    name = "decoded_model"
    stage = "eval"
    after = ("recurrence",)
    seen: list[GPT] = []

    def pgolf_on_artifact_loaded(self, model, ctx):
        DecodedModel.seen.append(model)


def test_the_loop_is_rebuilt_and_switched_on_when_the_artifact_is_decoded(micro_recipe, tmp_path):
    params = {"loop_start": 0, "loop_end": 1, "num_loops": 2, "enable_at": 0.3, "untie_mlp": True}
    result = run(micro_recipe(techniques={"recurrence": params}), tmp_path, QUIET)
    assert result["metrics"]["recurrence"]["activations"] == [{"step": 1, "frac": pytest.approx(1 / 3), "passes": 2}]
    artifact = Artifact.from_file(tmp_path / "artifact.pga")
    _, meta = artifact.decode()
    session = session_from_artifact(meta, {"tests.test_recurrence:DecodedModel": {}}, reporter=QUIET)
    load_data(session)
    DecodedModel.seen = []
    scored = eval_stage(session, artifact, meta["train"])
    (model,) = DecodedModel.seen
    assert model.looping_active and model.layer_plan() == ([0, 1, 2], [3, 4, 5])  # 2 blocks + 4 untied passes
    trained_copy = model.extra_blocks[0].mlp.fc.weight
    assert not torch.equal(trained_copy, model.blocks[0].mlp.fc.weight)  # loaded, not re-copied from the block
    assert scored.result["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)  # the same looped graph scored
    # The judged trace of the artifact re-scored: the stored train and export stages plus this eval stage.
    hooks = scored.manifest["trace"]["recurrence"]
    assert hooks["pgolf_on_model_built"]["calls"] == 3  # the trained model, its rebuild for export, the decoded one
    assert hooks["pgolf_on_artifact_loaded"]["calls"] == 2  # before export (looping as training left it) and after decoding
    assert hooks["pgolf_contribute_warmup_phases"]["calls"] == 1


def test_looping_is_on_for_evaluation_even_if_training_ended_first(micro_recipe, tmp_path):
    params = {"loop_start": 0, "loop_end": 1, "num_loops": 1, "enable_at": 1.0, "untie_mlp": True}
    result = run(micro_recipe(techniques={"recurrence": params}), tmp_path, QUIET)
    assert result["metrics"]["recurrence"]["activations"] == []
    state = torch.load(tmp_path / "final_model.pt", weights_only=True)
    for layer in (0, 1):  # passes that never trained start as their block's final MLP
        assert torch.equal(state[f"extra_blocks.{layer}.mlp.fc.weight"], state[f"blocks.{layer}.mlp.fc.weight"])
    plain = run(micro_recipe(), tmp_path / "plain", QUIET)
    assert result["val_bpb_prequant"] != plain["val_bpb_prequant"]  # the evaluated graph loops


def test_repeated_pass_holds_no_copy_of_the_shared_block():
    cfg = RecurrenceConfig(loop_start=4, loop_end=5, num_loops=1, untie_mlp=True)
    model = looped(cfg)
    clone = copy.deepcopy(model)
    rp = clone.extra_blocks[0]
    assert isinstance(rp, RepeatedPass) and rp.shared is clone.blocks[4]
    assert sorted(k for k, _ in rp.named_parameters()) == ["mlp.fc.weight", "mlp.proj.weight"]


def test_a_saved_checkpoint_is_rescored_with_the_loop_on(micro_recipe, tmp_path):
    from tests.conftest import MICRO

    params = "{loop_start: 0, loop_end: 1, num_loops: 1, enable_at: 0.3}"
    result = run(micro_recipe(f"techniques.recurrence={params}"), tmp_path, QUIET)
    scored = evaluate_target(tmp_path / "final_model.pt", scale="tiny",
                             overrides=[*MICRO, f"techniques.recurrence={params}"], log=lambda m: None)
    assert scored["val_bpb_prequant"] == pytest.approx(result["val_bpb_prequant"], rel=1e-9)
    assert scored["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)


def test_lanes_must_start_after_the_loop_as_the_records_run_it():
    """Full size (11 layers, loop 3-5, lanes from 8) and tiny (4 layers, loop 1-2, lanes from 3) agree with the
    records' code; lanes from 2 at tiny would send looped block 1 back into the lanes, which the records' code
    runs outside them."""
    assert lane_order_problem(11, RecurrenceConfig(loop_start=3, loop_end=5, num_loops=2), 8) is None
    assert lane_order_problem(4, RecurrenceConfig(loop_start=1, loop_end=2, num_loops=2), 3) is None
    problem = lane_order_problem(4, RecurrenceConfig(loop_start=1, loop_end=2, num_loops=2), 2)
    assert problem is not None and "[2, 1, 2, 3]" in problem and "block(s) [1]" in problem
    assert lane_order_problem(4, RecurrenceConfig(loop_start=1, loop_end=2), -1) is None

"""The record stack's small training techniques: each sets what its record used and the model or
optimizer does the math; a technique toggled off leaves a run bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from pgolf.api import STAGES
from pgolf.errors import ConfigError
from pgolf.hookspecs import HOOK_STAGES
from pgolf.host import Session, run
from pgolf.loop import lr_multiplier
from pgolf.model import GPT
from pgolf.optim import Muon, build_optimizers
from pgolf.recipe import RECIPES_DIR, ModelConfig, OptimConfig, TrainConfig, load_recipe
from pgolf.registry import load_technique_class, resolve, silent_techniques
from pgolf.reporter import Reporter
from pgolf_plugins import BUILTINS
from pgolf_plugins.leaky_relu import use_leaky_relu2
from pgolf_plugins.muon_eq_r import use_row_normalized_muon
from pgolf_plugins.muon_wd import MuonWDConfig, use_weight_decay
from pgolf_plugins.parallel_residuals import use_parallel_residuals
from pgolf_plugins.partial_rope import use_partial_rope
from pgolf_plugins.qk_gain import set_qk_gain
from pgolf_plugins.recurrence import RecurrenceConfig, activate, apply_recurrence
from pgolf_plugins.smear_gate import use_smear_gate
from pgolf_plugins.warmdown import WarmdownConfig, use_warmdown
from pgolf_plugins.xsa import use_xsa
from tests.conftest import REPO

QUIET = Reporter(quiet=True)
MINE = ["ema", "leaky_relu", "muon_eq_r", "muon_wd", "parallel_residuals", "partial_rope", "qk_gain", "recurrence",
        "smear_gate", "warmdown", "xsa"]


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1), **kw})


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambdas" not in name:
                p.normal_(0, 0.1)
    return model


TOKENS = torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def configured(name: str, params: dict | None = None, *overrides: str, micro_recipe) -> Session:
    """A session with one technique configured (no data loaded, nothing trained)."""
    return Session(micro_recipe(*overrides, techniques={name: params or {}}), reporter=QUIET)


# --- leaky_relu --------------------------------------------------------------------------------


def test_leaky_relu_squares_a_leaky_negative_side():
    cfg = small()
    use_leaky_relu2(cfg)
    mlp = GPT(cfg).blocks[0].mlp
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(3, 32)
    h = x @ mlp.fc.weight.T
    expected = torch.where(h > 0, h * h, (0.5 * h) ** 2) @ mlp.proj.weight.T
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_leaky_relu_plugin_sets_the_record_slope(micro_recipe):
    model = configured("leaky_relu", micro_recipe=micro_recipe).recipe.model
    assert (model.activation, model.leaky_slope) == ("leaky_relu2", 0.5)


# --- qk_gain -----------------------------------------------------------------------------------


def test_qk_gain_starts_every_head_at_the_record_value(micro_recipe):
    recipe = configured("qk_gain", micro_recipe=micro_recipe).recipe
    model = GPT(recipe.model)
    assert all(torch.all(b.attn.q_gain == 5.25) for b in model.blocks)
    cfg = small()
    set_qk_gain(cfg, 4.0)
    assert torch.all(GPT(cfg).blocks[0].attn.q_gain == 4.0)


# --- partial_rope ------------------------------------------------------------------------------


def test_partial_rope_rotates_16_dims_and_scales_norms_by_depth():
    cfg = small(model_dim=64, num_heads=2)
    use_partial_rope(cfg)
    model = GPT(cfg)
    assert [b.attn.rope_dims for b in model.blocks] == [16] * 4
    assert [b.norm_scale for b in model.blocks] == [1 / math.sqrt(i + 1) for i in range(4)]
    attn = model.blocks[0].attn
    q = torch.randn(1, 2, 6, 32)
    cos, sin = attn.rotary(6, q.device, q.dtype)
    out = attn._rope(q, cos, sin)
    torch.testing.assert_close(out[..., 16:], q[..., 16:], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :, 0], q[:, :, 0])  # position 0 is not rotated
    assert not torch.allclose(out[:, :, 1:, :16], q[:, :, 1:, :16])


def test_partial_rope_wider_than_a_head_fails_before_the_run(micro_recipe):
    with pytest.raises(ConfigError, match="head dimension is 32"):
        configured("partial_rope", {"dims": 48}, micro_recipe=micro_recipe)


# --- xsa ---------------------------------------------------------------------------------------


def test_xsa_covers_the_last_n_layers():
    cfg = small()
    use_xsa(cfg, 2)
    assert [b.attn.xsa for b in GPT(cfg).blocks] == [False, False, True, True]
    use_xsa(cfg, 11)  # the records' "all 11" on a shallower model: every layer
    assert all(b.attn.xsa for b in GPT(cfg).blocks)


def test_xsa_output_has_no_component_along_the_own_value():
    cfg = small(num_heads=4, num_kv_heads=2)
    use_xsa(cfg, 1)
    attn = randomized(cfg).blocks[3].attn
    captured = {}
    attn.proj.register_forward_hook(lambda mod, inp, out: captured.__setitem__("y", inp[0]))
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        attn(x)
        v = attn.c_v(x).reshape(1, 7, 2, 8)
    y = captured["y"].reshape(1, 7, 2, 2, 8)
    assert (y * F.normalize(v, dim=-1).unsqueeze(3)).sum(-1).abs().max() < 1e-5


# --- parallel_residuals ------------------------------------------------------------------------


def test_two_lanes_add_the_records_routing_parameters():
    cfg = small()
    use_parallel_residuals(cfg, 2)
    model = GPT(cfg)
    assert tuple(model.parallel_post_lambdas.shape) == (4, 2, 2) and torch.all(model.parallel_post_lambdas == 1)
    assert tuple(model.parallel_resid_lambdas.shape) == (4, 2) and torch.all(model.parallel_resid_lambdas == 1.1)
    assert "parallel_post_lambdas" not in GPT(small(parallel_start_layer=2)).state_dict()  # the sum variant


def test_two_lanes_with_unit_routing_equal_the_summed_variant():
    """Both lanes start equal and, with resid 1, resid_mix at init and no U-Net skip (which only
    lane 0 receives), get the same writes, so their mean is the summed variant's stream."""
    lanes_cfg, sum_cfg = small(), small()
    use_parallel_residuals(lanes_cfg, 2, "two_lane")
    use_parallel_residuals(sum_cfg, 2, "sum")
    summed = randomized(sum_cfg)
    with torch.no_grad():
        summed.skip_weights.zero_()
        for b in summed.blocks:
            b.resid_mix.copy_(torch.stack((torch.ones(32), torch.zeros(32))))
    lanes = GPT(lanes_cfg)
    lanes.load_state_dict(summed.state_dict(), strict=False)
    with torch.no_grad():
        lanes.parallel_resid_lambdas.fill_(1.0)
        torch.testing.assert_close(lanes.log_probs(TOKENS), summed.log_probs(TOKENS), rtol=1e-5, atol=1e-5)
        lanes.parallel_post_lambdas[:, 1, 0] = 0.0  # the MLP stops writing into the attention lane
        assert not torch.allclose(lanes.log_probs(TOKENS), summed.log_probs(TOKENS), atol=1e-4)


def test_lanes_begin_in_the_decoder():
    """Encoder blocks stay single-lane, so any start inside the encoder means 'from the first decoder block'."""
    early, at_decoder = small(), small()
    use_parallel_residuals(early, 0)
    use_parallel_residuals(at_decoder, 2)
    a = randomized(early)
    b = GPT(at_decoder)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(a.log_probs(TOKENS), b.log_probs(TOKENS), rtol=0, atol=0)


def test_untied_repeated_passes_run_in_the_lanes():
    cfg = small()
    use_parallel_residuals(cfg, 2)
    shared, untied = randomized(cfg), GPT(cfg)
    loop = RecurrenceConfig(loop_start=2, loop_end=3, num_loops=1)
    apply_recurrence(shared, loop)
    untied_loop = RecurrenceConfig(loop_start=2, loop_end=3, num_loops=1, untie_mlp=True)
    apply_recurrence(untied, untied_loop)
    untied.load_state_dict(shared.state_dict(), strict=False)
    activate(shared, loop, 0, 1)
    activate(untied, untied_loop, 0, 1)
    with torch.no_grad():
        torch.testing.assert_close(untied.log_probs(TOKENS), shared.log_probs(TOKENS), rtol=0, atol=0)


def test_parallel_start_past_the_model_fails_before_the_run(micro_recipe):
    with pytest.raises(ConfigError, match="starts at layer 8 but the model has 2 layers"):
        configured("parallel_residuals", micro_recipe=micro_recipe)


# --- smear_gate --------------------------------------------------------------------------------


@pytest.mark.parametrize("bos_fix", [True, False])
def test_smear_gate_leaks_across_a_bos_only_without_the_fix(bos_fix):
    cfg = small()
    use_smear_gate(cfg, bos_fix)
    model = randomized(cfg)
    with torch.no_grad():
        model.smear.smear_lambda.fill_(1.0)
    bos = model.bos_id
    doc_a = torch.tensor([[5, 6, 7, 8, bos, 9, 10, 11]])
    doc_b = doc_a.clone()
    doc_b[0, 3] = 40  # only the previous document's last token differs
    with torch.no_grad():
        a, b = model.embed(doc_a), model.embed(doc_b)
    at_bos = 4
    assert not torch.equal(a[0, 3], b[0, 3])
    assert torch.equal(a[0, at_bos], b[0, at_bos]) == bos_fix
    torch.testing.assert_close(a[0, at_bos + 1:], b[0, at_bos + 1:], rtol=0, atol=0)


def test_smear_gate_fix_is_on_by_default(micro_recipe):
    model = configured("smear_gate", micro_recipe=micro_recipe).recipe.model
    assert model.smear_gate and model.smear_bos_fix


# --- muon_wd / muon_eq_r -----------------------------------------------------------------------


def test_weight_decay_reaches_every_optimizer_group(micro_recipe):
    optim = configured("muon_wd", micro_recipe=micro_recipe).recipe.optim
    model = GPT(small())
    token, muon, scalar = build_optimizers(model, optim, tie_embeddings=True)
    assert isinstance(muon, Muon) and muon.param_groups[0]["weight_decay"] == 0.095
    assert isinstance(token, torch.optim.AdamW) and token.param_groups[0]["weight_decay"] == 0.085
    assert isinstance(scalar, torch.optim.AdamW) and scalar.param_groups[0]["weight_decay"] == 0.02
    before = model.tok_emb.weight.detach().clone()
    model.tok_emb.weight.grad = torch.zeros_like(before)
    token.step()  # a zero gradient leaves only the decoupled decay
    torch.testing.assert_close(model.tok_emb.weight.detach(), before * (1 - 0.05 * 0.085))


def test_embedding_decay_is_separate_from_scalar_decay():
    optim = OptimConfig()
    use_weight_decay(optim, **{"muon": 0.04, "embed": 0.0, "adam": 0.01})
    token, _, scalar = build_optimizers(GPT(small()), optim, tie_embeddings=True)
    assert not isinstance(token, torch.optim.AdamW) and scalar.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="techniques.muon_wd.weight_decay"):
        resolve({"muon_wd": {"weight_decay": -0.1}})
    assert MuonWDConfig().weight_decay == 0.095


def test_muon_eq_r_turns_on_row_normalisation(micro_recipe):
    optim = configured("muon_eq_r", micro_recipe=micro_recipe).recipe.optim
    _, muon, _ = build_optimizers(GPT(small()), optim, tie_embeddings=True)
    assert muon.param_groups[0]["row_normalize"]
    plain = OptimConfig()
    use_row_normalized_muon(plain)
    assert plain.muon_row_normalize


# --- warmdown ----------------------------------------------------------------------------------


def test_warmdown_is_linear_over_the_last_fraction_with_a_floor():
    train = TrainConfig(iterations=1000, max_wallclock_seconds=0)
    use_warmdown(train, WarmdownConfig().frac, WarmdownConfig().min_lr_scale)
    scales = {step: lr_multiplier(step, 0.0, train, None) for step in (0, 250, 625, 850, 950, 999)}
    assert scales[0] == scales[250] == 1.0
    assert scales[625] == pytest.approx(0.5)
    assert scales[850] == pytest.approx(0.2)
    assert scales[950] == scales[999] == pytest.approx(0.1)  # floored at MIN_LR instead of reaching 0
    assert lr_multiplier(10, 300.0, train, 600.0) == pytest.approx(2 / 3)  # wallclock-keyed when capped


# --- acting by configuring ----------------------------------------------------------------------


def acts_only_by_configuring(name: str) -> bool:
    """No hook of its stage or a later one: the technique acts by changing the recipe, or not at all."""
    cls = load_technique_class(name)
    later = set(STAGES[STAGES.index(cls.stage):])
    return "pgolf_configure" in cls.hook_names() and not any(HOOK_STAGES.get(h) in later for h in cls.hook_names())


CONFIGURE_ONLY = sorted(name for name in BUILTINS if acts_only_by_configuring(name))
SCALES = [None, *sorted(p.stem for p in (RECIPES_DIR / "scales").glob("*.yaml"))]


def test_the_configure_only_techniques():
    assert CONFIGURE_ONLY == ["asym_logit", "attn_out_gate", "bigram_hash", "codec", "doc_isolation", "gated_attn",
                              "leaky_relu", "muon_eq_r", "muon_wd", "orthogonal_init", "parallel_residuals",
                              "partial_rope", "polar_express", "qk_gain", "skip_gates", "smear_gate",
                              "sparse_attn_gate", "warmdown", "wd_taper", "xsa"]


# wd_taper scales Muon's weight decay: alone on the baseline (no decay) it is a config error, so it is
# toggled on with the decay it tapers
NEEDS = {"wd_taper": ["muon_wd"]}


def acted_by_configuring(recipe) -> tuple[set[str], list[str]]:
    """(configure-only techniques the recipe enables, those whose configure changed nothing)."""
    session = Session(recipe, reporter=QUIET)
    enabled = {e.name for e in session.enabled if e.name in CONFIGURE_ONLY}
    return enabled, sorted(enabled - session.trace.configured)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", CONFIGURE_ONLY)
def test_each_default_changes_the_baseline_recipe(name, scale):
    """Toggled on the baseline (as `pgolf ablate --toggle` does), every default changes the recipe."""
    recipe = load_recipe(RECIPES_DIR / "baseline.yaml", scale=scale, enable=[name, *NEEDS.get(name, [])])
    enabled, silent = acted_by_configuring(recipe)
    assert enabled == {name, *NEEDS.get(name, [])} and silent == []


def test_a_configure_that_changes_nothing_never_acts():
    """Settings equal to the recipe's are a no-op ablation row: the run fails them as never acted."""
    recipe = load_recipe(RECIPES_DIR / "baseline.yaml")
    recipe.techniques.update({"qk_gain": {"init": 1.5}, "xsa": {},
                              "muon_wd": {"weight_decay": 0.0, "embed_weight_decay": 0.0, "adam_weight_decay": 0.0}})
    session = Session(recipe, reporter=QUIET)
    assert silent_techniques(session.enabled, session.trace) == ["muon_wd", "qk_gain"]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_no_shipped_recipe_enables_a_technique_that_changes_nothing(path, scale):
    _, silent = acted_by_configuring(load_recipe(path, scale=scale))
    assert silent == []


@pytest.mark.parametrize("path", sorted((REPO / "ablations").glob("*.yaml")), ids=lambda p: p.stem)
def test_no_shipped_ablation_toggles_a_technique_that_changes_nothing(path):
    """Each toggled configure-only technique, alone on the spec's all-off arm, changes the recipe."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    toggles = list(spec["toggle"])
    for name in [t for t in toggles if t in CONFIGURE_ONLY]:
        sets = [s for s in spec.get("set") or [] if not s.startswith("techniques.") or s.startswith(f"techniques.{name}.")]
        recipe = load_recipe(path.parent / spec["recipe"], sets, scale=spec.get("scale"), enable=[name])
        recipe.techniques = {k: v for k, v in recipe.techniques.items() if k == name or k not in toggles}
        enabled, silent = acted_by_configuring(recipe)
        assert name in enabled and silent == [], name


# --- toggling ----------------------------------------------------------------------------------


def _checkpoint(path) -> dict[str, torch.Tensor]:
    return torch.load(path / "final_model.pt", weights_only=True)


def _same_bits(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


STACK = {"leaky_relu": {}, "qk_gain": {}, "partial_rope": {}, "xsa": {}, "smear_gate": {}, "muon_wd": {},
         "muon_eq_r": {}, "warmdown": {}, "parallel_residuals": {"start_layer": 1},
         "recurrence": {"loop_start": 0, "loop_end": 1, "num_loops": 1, "enable_at": 0.3}}


@pytest.mark.slow
def test_a_technique_toggled_off_leaves_the_run_bit_identical(micro_recipe, tmp_path):
    plain = run(micro_recipe(), tmp_path / "plain", QUIET)
    stack = run(micro_recipe(techniques={**STACK, "ema": {"decay": 0.5}}), tmp_path / "stack", QUIET)
    without = run(micro_recipe(techniques=STACK), tmp_path / "without", QUIET)
    toggled_off = micro_recipe("techniques.ema.decay=0.5", "techniques.ema=false", techniques=STACK)
    toggled = run(toggled_off, tmp_path / "toggled", QUIET)
    assert toggled["val_bpb"] == without["val_bpb"] != stack["val_bpb"]
    assert _same_bits(_checkpoint(tmp_path / "toggled"), _checkpoint(tmp_path / "without"))

    all_off = micro_recipe(*(f"techniques.{name}=false" for name in MINE))
    again = run(all_off, tmp_path / "all_off", QUIET)  # after every technique ran in this process
    assert again["val_bpb"] == plain["val_bpb"] and again["val_bpb_prequant"] == plain["val_bpb_prequant"]
    assert _same_bits(_checkpoint(tmp_path / "all_off"), _checkpoint(tmp_path / "plain"))

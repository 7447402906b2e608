"""The training components of the final records: orthogonal init, Polar Express Newton-Schulz, the
Muon weight-decay taper, BigramHash and AsymLogit, each against hand-computed values or the
records' own figures (cited where used)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.errors import ConfigError
from pgolf.host import Session
from pgolf.model import GPT, asym_softcap, bigram_hash, model_fields_from_state
from pgolf.optim import (
    Muon,
    muon_weight_decay_at,
    newton_schulz_coefficients,
    split_parameters,
    weight_decay_taper,
    zeropower_via_newtonschulz5,
)
from pgolf.quant import default_spec
from pgolf.recipe import ExportConfig, ModelConfig, OptimConfig
from pgolf.reporter import Reporter
from pgolf.testing import micro_recipe
from tests.conftest import pinned_threads

SMALL = dict(vocab_size=128, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1, mlp_mult=2.0)


@pytest.fixture(autouse=True)
def _threads():
    with pinned_threads():
        yield


def small_model(**fields) -> GPT:
    return GPT(ModelConfig(**{**SMALL, **fields}))


# --- orthogonal init ------------------------------------------------------------------------------


def test_orthogonal_init_draws_in_the_records_bank_order():
    """#1855 `_init_weights`: tied embedding N(0, std), then q, k, v of each layer, then each MLP up
    (all orthogonal, gain 1); output projections zero. Same generator state, same matrices."""
    model = small_model(orthogonal_init=True)
    torch.manual_seed(7)
    model._init_weights(model.cfg.tied_embed_init_std)
    torch.manual_seed(7)
    emb = nn.init.normal_(torch.empty(128, 64), std=0.005)
    qkv = [[nn.init.orthogonal_(torch.empty(rows, 64)) for rows in (64, 32, 32)] for _ in range(2)]
    up = [nn.init.orthogonal_(torch.empty(128, 64)) for _ in range(2)]
    assert torch.equal(model.tok_emb.weight, emb)
    for i, block in enumerate(model.blocks):
        for lin, expected in zip((block.attn.c_q, block.attn.c_k, block.attn.c_v), qkv[i], strict=True):
            assert torch.equal(lin.weight, expected)
        assert torch.equal(block.mlp.fc.weight, up[i])
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()


def test_orthogonal_init_rows_are_orthonormal_and_the_untied_head_stays_zero():
    model = small_model(orthogonal_init=True, tie_embeddings=False)
    q = model.blocks[0].attn.c_q.weight
    k = model.blocks[0].attn.c_k.weight  # 32 x 64: orthonormal rows
    up = model.blocks[0].mlp.fc.weight  # 128 x 64: orthonormal columns
    torch.testing.assert_close(q @ q.T, torch.eye(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(k @ k.T, torch.eye(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(up.T @ up, torch.eye(64), atol=1e-5, rtol=0)
    assert model.lm_head is not None and not model.lm_head.weight.any()
    plain = small_model()
    assert (plain.blocks[0].attn.c_q.weight @ plain.blocks[0].attn.c_q.weight.T - torch.eye(64)).abs().max() > 0.5


# --- Polar Express --------------------------------------------------------------------------------

# #1787 train_gpt.py `_PE_COEFFS` (first and last rows), copied as figures.
PE_FIRST = (8.156554524902461, -22.48329292557795, 15.878769915207462)
PE_LAST = (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)


def test_polar_express_table_is_the_records_and_each_step_is_its_polynomial():
    table = newton_schulz_coefficients("polar_express", 5)
    assert table[0] == PE_FIRST and table[-1] == PE_LAST
    # diag(3, 4) normalises to diag(0.6, 0.8); one step maps each singular value s to a s + b s^3 + c s^5.
    out = zeropower_via_newtonschulz5(torch.diag(torch.tensor([3.0, 4.0])), coefficients=table[:1])
    a, b, c = PE_FIRST
    expected = [a * s + b * s**3 + c * s**5 for s in (0.6, 0.8)]  # 0.9713..., 0.8905...
    torch.testing.assert_close(out.diagonal().double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert not out.fill_diagonal_(0).any()


def test_polar_express_brings_singular_values_closer_to_one_in_five_steps():
    g = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    spread = {kind: (torch.linalg.svdvals(zeropower_via_newtonschulz5(
        g, coefficients=newton_schulz_coefficients(kind, 5)).double()) - 1).abs().max().item()
        for kind in ("default", "polar_express")}
    assert spread["polar_express"] < 0.2 < 0.3 < spread["default"]  # measured 0.141 against 0.318


def test_more_steps_than_the_table_holds_is_a_config_error():
    with pytest.raises(ConfigError, match="holds 5 iterations") as err:
        newton_schulz_coefficients("polar_express", 6)
    assert err.value.key == "optim.muon_backend_steps"
    with pytest.raises(ConfigError):
        Muon([nn.Parameter(torch.zeros(4, 4))], lr=0.1, momentum=0.9, backend_steps=6, ns_coefficients="polar_express")
    assert [k for k, _ in OptimConfig(muon_ns_coefficients="polar_express", muon_backend_steps=6).validate()] == [
        "muon_backend_steps"]
    with pytest.raises(ConfigError, match="polar_express: its coefficient table holds 5"):
        Session(micro_recipe("optim.muon_backend_steps=7", techniques={"polar_express": {}}),
                reporter=Reporter(quiet=True))


def test_default_coefficients_keep_the_baseline_tuple_for_any_step_count():
    assert newton_schulz_coefficients("default", 7) == [(3.4445, -4.7750, 2.0315)] * 7


# --- weight-decay taper ---------------------------------------------------------------------------


@pytest.mark.parametrize(("frac", "mult"), [(0.0, 1.0), (0.7, 1.0), (0.85, 0.75), (1.0, 0.5), (1.3, 0.5)])
def test_wd_taper_is_flat_until_start_then_linear_to_the_final_multiple(frac, mult):
    # #1729 WD_TAPER_START_FRAC=0.70, WD_TAPER_FINAL_MULT=0.50
    assert weight_decay_taper(frac, 0.70, 0.50) == pytest.approx(mult)


def test_wd_taper_scales_muon_weight_decay_and_is_off_by_default():
    assert muon_weight_decay_at(0.85, OptimConfig(muon_weight_decay=0.095)) == 0.095
    tapered = OptimConfig(muon_weight_decay=0.095, muon_wd_taper_start_frac=0.7, muon_wd_taper_final_mult=0.5)
    assert muon_weight_decay_at(0.85, tapered) == pytest.approx(0.07125)


def test_wd_taper_without_weight_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="nothing to taper"):
        Session(micro_recipe(techniques={"wd_taper": {}}), reporter=Reporter(quiet=True))
    session = Session(micro_recipe(techniques={"muon_wd": {}, "wd_taper": {}}), reporter=Reporter(quiet=True))
    optim = session.recipe.optim
    assert (optim.muon_weight_decay, optim.muon_wd_taper_start_frac, optim.muon_wd_taper_final_mult) == (0.095, 0.7, 0.5)


# --- BigramHash -----------------------------------------------------------------------------------


def reference_hash(prev: int, cur: int, buckets: int) -> int:
    """The records' formula on Python ints, with int32 wrap-around of each product."""
    def wrap(v: int) -> int:
        return (v + 2**31) % 2**32 - 2**31
    return (wrap(36313 * cur) ^ wrap(27191 * prev)) % (buckets - 1)


def test_bigram_hash_matches_the_formula_and_reserves_the_last_bucket_for_position_zero():
    tokens = torch.tensor([[5, 7, 1, 1023, 65535, 60000], [1, 2, 3, 4, 5, 6]])
    out = bigram_hash(tokens, 3072)
    assert out.dtype == torch.long and out[:, 0].tolist() == [3071, 3071]
    for row, ids in zip(out.tolist(), tokens.tolist(), strict=True):
        assert row[1:] == [reference_hash(p, c, 3072) for p, c in zip(ids[:-1], ids[1:], strict=True)]
    # the #1019 `bigram_hash` run on CPU on these tokens gave these buckets (65535 * 36313 wraps in int32)
    assert out.tolist() == [[3071, 2085, 1675, 846, 1483, 541], [3071, 2467, 2564, 2561, 554, 2079]]
    assert 0 <= out.min() and out.max() <= 3071


def test_bigram_hash_module_names_init_and_gradient():
    model = small_model(bigram_vocab_size=256, bigram_dim=96)
    names = {n for n, _ in model.named_parameters() if n.startswith("bigram.")}
    assert names == {"bigram.embed.weight", "bigram.proj.weight", "bigram.scale"}
    assert not model.bigram.embed.weight.any() and model.bigram.scale.item() == pytest.approx(0.05)
    proj = model.bigram.proj.weight  # 64 x 96, orthogonal (the records' init pass)
    torch.testing.assert_close(proj @ proj.T, torch.eye(64), atol=1e-5, rtol=0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = small_model()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("bigram.")})
    torch.testing.assert_close(model(ids, ids), plain(ids, ids))  # a zero table: no change at init
    model(ids, ids).backward()
    assert model.bigram.embed.weight.grad.abs().sum() > 0  # the orthogonal projection lets the table learn
    groups = split_parameters(model)
    assert any(p is model.bigram.embed.weight for p in groups["token"])
    assert {id(model.bigram.proj.weight), id(model.bigram.scale)} <= {id(p) for p in groups["scalar"]}
    assert model_fields_from_state(model.state_dict())["bigram_vocab_size"] == 256


def test_bigram_hash_too_narrow_to_learn_is_a_config_error():
    with pytest.raises(ConfigError, match="never learn"):
        Session(micro_recipe(techniques={"bigram_hash": {"dim": 32}}), reporter=Reporter(quiet=True))


# --- AsymLogit ------------------------------------------------------------------------------------


def test_asym_softcap_caps_each_sign_with_its_own_scalar():
    z = torch.tensor([-40.0, -1.0, 0.0, 2.0, 50.0])
    out = asym_softcap(z, torch.tensor(20.0), torch.tensor(40.0))
    expected = [40 * torch.tanh(torch.tensor(-1.0)), 40 * torch.tanh(torch.tensor(-1 / 40)), 0.0,
                20 * torch.tanh(torch.tensor(0.1)), 20 * torch.tanh(torch.tensor(2.5))]
    torch.testing.assert_close(out, torch.tensor([float(v) for v in expected]))


def test_asym_logit_scores_with_its_caps_but_trains_with_the_plain_softcap():
    model = small_model(asym_logit=True)
    plain = small_model()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("softcap_")})
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    assert model.softcap_pos.item() == model.softcap_neg.item() == 30.0
    torch.testing.assert_close(model.token_nll(ids, ids), plain.token_nll(ids, ids))  # identity at init
    with torch.no_grad():
        model.softcap_pos.fill_(2.0)
        model.softcap_neg.fill_(3.0)
        model.tok_emb.weight.mul_(400)  # logits of a few units, so the small caps bite
        plain.tok_emb.weight.mul_(400)
    assert (model.token_nll(ids, ids) - plain.token_nll(ids, ids)).abs().max() > 1e-2
    loss = model(ids, ids)
    assert torch.equal(loss, plain(ids, ids))
    loss.backward()
    assert model.softcap_pos.grad is None and model.softcap_neg.grad is None
    model.token_nll(ids, ids).sum().backward()  # a test-time pass through the scoring path trains them
    assert model.softcap_pos.grad.abs() > 0 and model.softcap_neg.grad.abs() > 0


def test_asym_logit_scalars_are_in_no_training_optimizer_and_export_as_fp16():
    model = small_model(asym_logit=True)
    held = {id(p) for group in split_parameters(model).values() for p in group}
    assert id(model.softcap_pos) not in held and id(model.softcap_neg) not in held
    assert default_spec("softcap_pos", model.softcap_pos.detach(), ExportConfig()).scheme == "fp16"
    assert model_fields_from_state(model.state_dict())["asym_logit"] is True

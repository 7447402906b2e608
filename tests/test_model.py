"""The GPT matches the challenge's train_gpt.py names, shapes and loss; options stay opt-in."""

from __future__ import annotations

import math

import pytest
import torch

from pgolf.model import GPT, exclusive_self_attention
from pgolf.recipe import ModelConfig

# The baseline's state dict as saved by the challenge's train_gpt.py (9 x 512, vocab 1024):
# 17,059,912 parameters. Per-block entries repeat for blocks 0..8.
BASELINE_TOP = {"tok_emb.weight": (1024, 512), "skip_weights": (4, 512)}
BASELINE_BLOCK = {
    "attn_scale": (512,), "mlp_scale": (512,), "resid_mix": (2, 512), "attn.q_gain": (8,),
    "attn.c_q.weight": (512, 512), "attn.c_k.weight": (256, 512), "attn.c_v.weight": (256, 512),
    "attn.proj.weight": (512, 512), "mlp.fc.weight": (1024, 512), "mlp.proj.weight": (512, 1024),
}


def test_baseline_state_dict_matches_the_challenge_exactly():
    sd = GPT(ModelConfig()).state_dict()
    expected = dict(BASELINE_TOP)
    for i in range(9):
        expected.update({f"blocks.{i}.{k}": v for k, v in BASELINE_BLOCK.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sum(v.numel() for v in sd.values()) == 17_059_912


def test_untied_head_adds_lm_head():
    sd = GPT(ModelConfig(tie_embeddings=False)).state_dict()
    assert tuple(sd["lm_head.weight"].shape) == (1024, 512)


def small(**kw) -> ModelConfig:
    base = dict(vocab_size=64, num_layers=4, model_dim=32, num_heads=4, num_kv_heads=2)
    return ModelConfig(**{**base, **kw})


def randomized(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_init_follows_the_baseline():
    torch.manual_seed(0)
    model = GPT(small())
    assert model.tok_emb.weight.std().item() == pytest.approx(0.005, rel=0.2)
    assert all(b.attn.proj.weight.abs().sum() == 0 and b.mlp.proj.weight.abs().sum() == 0 for b in model.blocks)


def test_token_nll_and_log_probs_agree_with_the_training_loss():
    model = randomized(small())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        mean = model(x, y)
        nll = model.token_nll(x, y)
        logp = model.log_probs(x)
    assert nll.shape == (2, 16)
    assert nll.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    torch.testing.assert_close(-logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(2, 16), rtol=1e-5, atol=1e-5)


def test_logits_are_soft_capped():
    model = randomized(small(logit_softcap=2.0))
    with torch.no_grad():
        logits = model.logits(model.forward_hidden(torch.randint(0, 64, (1, 8))))
    assert logits.abs().max().item() <= 2.0


def test_model_is_causal():
    model = randomized(small(smear_gate=True))
    x = torch.randint(0, 64, (1, 12))
    x2 = x.clone()
    x2[0, 7:] = (x2[0, 7:] + 1) % 64
    with torch.no_grad():
        a, b = model.log_probs(x), model.log_probs(x2)
    torch.testing.assert_close(a[0, :7], b[0, :7])
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_loss_weights_change_training_loss_only():
    model = randomized(small())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        plain, nll = model(x, y), model.token_nll(x, y)
        model.loss_weights = torch.ones(64)
        assert model(x, y).item() == pytest.approx(plain.item(), rel=1e-6)
        w = torch.rand(64) + 0.1
        model.loss_weights = w
        expected = (nll * w[y]).sum() / w[y].sum()
        assert model(x, y).item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(model.token_nll(x, y), nll)
    assert "loss_weights" not in model.state_dict()


def test_options_add_parameters_only_when_enabled():
    assert set(GPT(small()).state_dict()) == set(GPT(small(activation="leaky_relu2", xsa_last_n=2, rope_dims=4,
                                                            parallel_start_layer=2, ln_scale=True)).state_dict())
    smear = GPT(small(smear_gate=True)).state_dict()
    assert {"smear.smear_gate_w", "smear.smear_lambda"} <= set(smear)


def test_smear_gate_is_identity_at_init_and_respects_bos():
    torch.manual_seed(0)
    plain, smeared = GPT(small()), GPT(small(smear_gate=True))
    smeared.load_state_dict({**plain.state_dict(), **{k: v for k, v in smeared.state_dict().items() if "smear" in k}})
    x = torch.randint(2, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(plain.log_probs(x), smeared.log_probs(x))
        smeared.smear.smear_lambda.fill_(1.0)
        emb = smeared.tok_emb(x)
        out = smeared.smear(emb, torch.ones_like(x, dtype=torch.bool))
        masked = smeared.smear(emb, torch.zeros_like(x, dtype=torch.bool))
    assert not torch.allclose(out, emb)
    torch.testing.assert_close(masked, emb)


def test_xsa_removes_the_component_along_the_own_value():
    y = torch.randn(2, 5, 4, 8)
    v = torch.randn(2, 5, 2, 8)
    out = exclusive_self_attention(y, v)
    vn = torch.nn.functional.normalize(v, dim=-1).repeat_interleave(2, dim=2)
    assert (out * vn).sum(-1).abs().max().item() < 1e-5


def test_partial_rope_leaves_the_other_dims_position_free():
    cfg = small(rope_dims=4)
    attn = GPT(cfg).blocks[0].attn
    q = torch.randn(1, 4, 6, 8)
    cos, sin = attn.rotary(6, q.device, q.dtype)
    out = attn._rope(q, cos, sin)
    torch.testing.assert_close(out[..., 4:], q[..., 4:])
    assert not torch.allclose(out[..., :4], q[..., :4])


def test_looping_walks_the_virtual_layer_lists():
    model = randomized(small())
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda mod, inp, out, i=i: seen.append(i))
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        model(x, x)
    assert seen == [0, 1, 2, 3]
    seen.clear()
    model.encoder_indices, model.decoder_indices = [0, 1, 2, 1], [2, 1, 2, 3]
    model.looping_active = True
    with torch.no_grad():
        model(x, x)
    assert seen == [0, 1, 2, 1, 2, 1, 2, 3]


def test_ln_scale_and_leaky_relu_change_the_function():
    x = torch.randint(0, 64, (1, 8))
    base = randomized(small(), seed=1)
    for cfg in (small(ln_scale=True), small(activation="leaky_relu2"), small(parallel_start_layer=1)):
        variant = GPT(cfg)
        variant.load_state_dict(base.state_dict())
        with torch.no_grad():
            assert not torch.allclose(base.log_probs(x), variant.log_probs(x))


def test_baseline_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(small())
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    with torch.no_grad():
        assert model(x, y).item() == pytest.approx(math.log(64), abs=0.05)

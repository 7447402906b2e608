"""Muon against an independent float64 Newton-Schulz, and the optimizer split of the baseline."""

from __future__ import annotations

import pytest
import torch

from pgolf.model import GPT
from pgolf.optim import Muon, build_optimizers, muon_momentum_at, split_parameters, zeropower_via_newtonschulz5
from pgolf.recipe import ModelConfig, OptimConfig


def reference_ns(g: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / (g.double().norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(32, 64), (64, 32), (48, 48)])
def test_newton_schulz_matches_a_float64_reference(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    out = zeropower_via_newtonschulz5(g, steps=5)
    torch.testing.assert_close(out.double(), reference_ns(g, 5), rtol=1e-4, atol=1e-4)
    s = torch.linalg.svdvals(out.double())
    assert 0.5 < s.min() and s.max() < 1.3  # approximately orthogonal, as Muon intends


def test_muon_step_is_nesterov_momentum_then_orthogonalised_and_scaled():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 32))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, backend_steps=5)
    grads = [torch.randn(64, 32) for _ in range(2)]
    buf = torch.zeros(64, 32)
    expected = start.double()
    for g in grads:
        p.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        update = reference_ns(g + 0.9 * buf, 5) * (64 / 32) ** 0.5
        expected = expected - 0.1 * update
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-4, atol=1e-4)


def test_weight_decay_is_decoupled():
    p = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([p], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5)
    p.grad = torch.zeros(8, 8)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((8, 8), 0.95))


def test_row_normalisation_makes_the_update_invariant_to_row_scaling():
    torch.manual_seed(0)
    g = torch.randn(16, 16)
    scaled = g * torch.linspace(0.1, 10, 16)[:, None]
    outs = []
    for grad in (g, scaled):
        p = torch.nn.Parameter(torch.zeros(16, 16))
        opt = Muon([p], lr=1.0, momentum=0.0, backend_steps=5, row_normalize=True)
        p.grad = grad.clone()
        opt.step()
        outs.append(p.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_split_matches_the_baseline():
    model = GPT(ModelConfig(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, vocab_size=64))
    groups = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["token"]} == {"tok_emb.weight"}
    assert all(".attn.c_" in names[id(p)] or ".proj." in names[id(p)] or ".fc." in names[id(p)] for p in groups["matrix"])
    scalar = {names[id(p)] for p in groups["scalar"]}
    assert "skip_weights" in scalar and "blocks.0.resid_mix" in scalar and "blocks.1.attn.q_gain" in scalar
    assert not groups["head"]
    opts = build_optimizers(model, OptimConfig(), tie_embeddings=True)
    assert [type(o).__name__ for o in opts] == ["Adam", "Muon", "Adam"]
    assert [o.param_groups[0]["base_lr"] for o in opts] == [0.05, 0.04, 0.04]


def test_momentum_warmup():
    cfg = OptimConfig()
    assert muon_momentum_at(0, cfg) == pytest.approx(0.85)
    assert muon_momentum_at(250, cfg) == pytest.approx(0.90)
    assert muon_momentum_at(10_000, cfg) == pytest.approx(0.95)

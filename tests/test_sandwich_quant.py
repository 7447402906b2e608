"""Sandwich quantization: the names -> bits policy, passthrough of small tensors, round-trip bounds,
and the size ordering of widths under a real codec."""

from __future__ import annotations

import zlib

import pytest
import torch

from pgolf.errors import ConfigError
from pgolf.host import Session, run
from pgolf.quant import QuantSpec, default_spec, dequantize, qmax, quantize_rtn
from pgolf.recipe import ExportConfig
from pgolf.reporter import Reporter
from pgolf_plugins.sandwich_quant import SandwichConfig, position_of, sandwich_bits
from tests.micro_training import technique

QUIET = Reporter(quiet=True)


@pytest.mark.parametrize(("name", "bits"), [
    ("tok_emb.weight", 7),
    ("lm_head.weight", 7),
    ("blocks.0.attn.c_q.weight", 8),
    ("blocks.0.mlp.fc.weight", 8),
    ("blocks.1.attn.c_k.weight", 6),
    ("blocks.4.mlp.proj.weight", 6),
    ("blocks.7.mlp.fc.weight", 6),
    ("blocks.8.attn.proj.weight", 8),
    ("blocks.8.mlp.proj.weight", 8),
    ("extra_blocks.0.mlp.fc.weight", 6),
    ("bigram.proj.weight", 6),
])
def test_default_policy_for_a_nine_layer_model(name, bits):
    assert sandwich_bits(name, 9, SandwichConfig()) == bits


def test_wider_outer_band_and_int5_mlps():
    cfg = SandwichConfig(outer_layers=3, middle_mlp_bits=5, embed_bits=8)
    table = {n: sandwich_bits(n, 10, cfg) for n in (
        "tok_emb.weight", "blocks.2.mlp.fc.weight", "blocks.3.mlp.fc.weight", "blocks.3.attn.c_v.weight",
        "blocks.6.mlp.proj.weight", "blocks.7.mlp.proj.weight", "extra_blocks.1.mlp.fc.weight")}
    assert table == {"tok_emb.weight": 8, "blocks.2.mlp.fc.weight": 8, "blocks.3.mlp.fc.weight": 5,
                     "blocks.3.attn.c_v.weight": 6, "blocks.6.mlp.proj.weight": 5, "blocks.7.mlp.proj.weight": 8,
                     "extra_blocks.1.mlp.fc.weight": 5}
    assert position_of("blocks.0.attn.c_q.weight", 10, 0) == "middle"  # no outer band: the records' all-int6


def test_small_and_control_tensors_stay_passthrough(micro_recipe):
    session = Session(micro_recipe(techniques={"sandwich_quant": {}}), reporter=QUIET)
    tech = technique(session, "sandwich_quant")
    cfg = ExportConfig()
    for name, tensor, scheme in (("blocks.0.attn_scale", torch.ones(512), "fp32"),
                                 ("blocks.0.attn.q_gain", torch.ones(8), "fp32"),
                                 ("skip_weights", torch.ones(4, 512), "fp32"),
                                 ("blocks.0.attn.c_k.weight", torch.randn(100, 100), "fp16"),
                                 ("step", torch.arange(3), "raw")):
        spec = default_spec(name, tensor, cfg)
        tech.pgolf_on_quant_spec(name, tensor, spec, session.ctx)
        assert spec.scheme == scheme and spec.bits == 8 and not spec.notes


@pytest.mark.parametrize("bits", [5, 6, 7, 8])
def test_round_trip_error_is_half_a_step_for_unclipped_entries(bits):
    torch.manual_seed(bits)
    w = torch.randn(64, 256) * 0.03
    spec = QuantSpec("int", bits=bits, clip="none", scale_floor=1e-10)
    qt = quantize_rtn("w", w, spec)
    scale = qt.parts["scale"].float()[:, None]
    assert qt.parts["q"].abs().max() <= qmax(bits)
    assert ((dequantize(qt) - w).abs() <= scale / 2 + w.abs() * 1e-3 + 1e-7).all()


def test_narrower_codes_compress_smaller():
    torch.manual_seed(0)
    w = torch.randn(256, 1024) * 0.02
    sizes = {b: len(zlib.compress(quantize_rtn("w", w, QuantSpec("int", bits=b)).parts["q"].numpy().tobytes(), 9))
             for b in (5, 6, 7, 8)}
    assert sizes[5] < sizes[6] < sizes[7] < sizes[8]


def test_config_errors(micro_recipe):
    with pytest.raises(ConfigError, match="2..8"):
        Session(micro_recipe(techniques={"sandwich_quant": {"middle_bits": 9}}), reporter=QUIET)
    with pytest.raises(ConfigError, match="outer_layers"):
        Session(micro_recipe(techniques={"sandwich_quant": {"outer_layers": 2}}), reporter=QUIET)  # 2 layers


def test_export_writes_the_policy(micro_recipe, tmp_path):
    result = run(micro_recipe(techniques={"sandwich_quant": {"outer_layers": 0}}), tmp_path, QUIET)
    bits = result["export"]["bits"]
    assert bits["tok_emb.weight"] == 7 and bits["blocks.0.mlp.fc.weight"] == 6 and bits["blocks.1.attn.c_q.weight"] == 6
    assert bits["blocks.0.attn_scale"] == 32 and bits["skip_weights"] == 32
    assert result["export"]["quant_notes"]["tok_emb.weight"] == ["sandwich_quant: int7 (embed)"]

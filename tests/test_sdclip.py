"""SDClip: the scale rule, its clipping statistics, its size knob, the Hessian-aware factor, and the
byte-target search (synthetic and through a real export)."""

from __future__ import annotations

import math
import zlib

import brotli
import numpy as np
import pytest
import torch

from pgolf.artifact import decode_artifact, encode_artifact, pack
from pgolf.errors import ConfigError
from pgolf.host import Session
from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf.reporter import Reporter
from pgolf_plugins.sdclip import (
    SDClipConfig,
    apply_sdclip,
    hessian_row_factor,
    sdclip_scale,
    search_multiplier,
    tensor_role,
)
from tests.micro_training import export_with as export_micro
from tests.micro_training import stored_tensors, technique, train_micro

QUIET = Reporter(quiet=True)


def normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def sdclip_spec(k: float, bits: int = 6, row_factor: torch.Tensor | None = None) -> QuantSpec:
    spec = QuantSpec("int", bits=bits)
    apply_sdclip(spec, k, row_factor)
    return spec


def entropy_bits(codes: torch.Tensor) -> float:
    _, counts = np.unique(codes.numpy(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.fixture(scope="module")
def gaussian_rows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sigmas = torch.exp(torch.randn(256, 1, generator=g) * 0.3) * 0.02  # rows of different widths
    return torch.randn(256, 4096, generator=g) * sigmas


def test_scale_is_k_std_over_r_with_a_tiny_floor(gaussian_rows):
    w = gaussian_rows.clone()
    w[5] = 0.0  # a dead row keeps a positive, tiny scale instead of the baseline's 1/R
    s = sdclip_scale(w, 12.85, 6)
    torch.testing.assert_close(s[:5], 12.85 * w[:5].std(dim=1) / 31)
    assert s[5] == 1e-10
    stored = quantize_rtn("w", w, sdclip_spec(12.85)).parts["scale"]
    torch.testing.assert_close(stored, s.half())


@pytest.mark.parametrize("k", [1.5, 2.0, 2.5])
def test_clipped_fraction_matches_the_gaussian_tail(gaussian_rows, k):
    w, bits = gaussian_rows, 6
    r = 2 ** (bits - 1) - 1
    qt = quantize_rtn("w", w, sdclip_spec(k, bits))
    scale = qt.parts["scale"].float()[:, None]
    err = (dequantize(qt) - w).abs()
    saturated = (qt.parts["q"].abs() == r).float().mean().item()
    clipped = (err > scale / 2 * 1.001).float().mean().item()  # beyond half a step: the clip bit
    # codes saturate from (R - 1/2) steps on and lose more than half a step beyond (R + 1/2) steps
    assert saturated == pytest.approx(2 * normal_cdf(-k * (r - 0.5) / r), abs=2e-3)
    assert clipped == pytest.approx(2 * normal_cdf(-k * (r + 0.5) / r), abs=2e-3)


def test_entropy_and_compressed_size_fall_as_k_grows(gaussian_rows):
    entropies, zsizes, bsizes = [], [], []
    for k in (4.0, 8.0, 12.0, 16.0, 20.0):
        codes = quantize_rtn("w", gaussian_rows, sdclip_spec(k)).parts["q"]
        raw = codes.numpy().tobytes()
        entropies.append(entropy_bits(codes))
        zsizes.append(len(zlib.compress(raw, 9)))
        bsizes.append(len(brotli.compress(raw, quality=9)))
    assert all(a > b for a, b in zip(entropies, entropies[1:], strict=False))
    assert all(a > b for a, b in zip(zsizes, zsizes[1:], strict=False))
    assert all(a > b for a, b in zip(bsizes, bsizes[1:], strict=False))
    # the Gaussian law H ~ b - log2 k + c: doubling k saves about one bit per code
    assert entropies[1] - entropies[3] == pytest.approx(1.0, abs=0.05)


def test_lambda_zero_is_plain_sdclip_and_uniform_inputs_give_factor_one(gaussian_rows):
    w = gaussian_rows[:32, :64]
    diag = torch.rand(64) + 0.1
    factor = hessian_row_factor(w, diag, 0.0)
    assert torch.equal(factor, torch.ones(32))
    plain = quantize_rtn("w", w, sdclip_spec(12.0))
    aware = quantize_rtn("w", w, sdclip_spec(12.0, row_factor=factor))
    assert all(torch.equal(plain.parts[k], aware.parts[k]) for k in plain.parts)
    uniform = torch.full((8, 16), 0.3) * torch.where(torch.rand(8, 16) > 0.5, 1.0, -1.0)
    torch.testing.assert_close(hessian_row_factor(uniform, torch.full((16,), 2.5), 0.175), torch.ones(8))


def test_hessian_factor_widens_rows_that_feed_important_inputs():
    w = torch.ones(2, 4) * 0.1
    w[0, 0] = 1.0  # row 0 puts its weight on the input with the large Hessian diagonal
    diag = torch.tensor([10.0, 1.0, 1.0, 1.0])
    factor = hessian_row_factor(w, diag, 0.175)
    assert factor[0] > 1.0 > factor[1]
    row_imp = (w.abs() * (diag / diag.mean())).mean(1)
    row_imp = row_imp / row_imp.mean()
    torch.testing.assert_close(factor, 1 + 0.175 * (row_imp - 1))


def test_roles_follow_the_record_name_rules():
    assert tensor_role("tok_emb.weight") == "embed"
    assert tensor_role("lm_head.weight") == "embed"
    assert tensor_role("blocks.3.mlp.fc.weight") == "mlp"
    assert tensor_role("blocks.3.attn.c_q.weight") == "attn"
    assert tensor_role("extra_blocks.0.attn.proj.weight") == "attn"
    assert tensor_role("bigram.proj.weight") == "matrix"


def linear_bytes(m: float) -> int:
    """A synthetic artifact: bytes fall linearly in log2 k, with a little curvature."""
    x = math.log2(m)
    return int(1_000_000 - 180_000 * x + 9_000 * x * x)


def test_search_lands_just_under_the_target_in_few_probes():
    calls = []
    result = search_multiplier(lambda m: calls.append(m) or linear_bytes(m), target=1_100_000, tolerance=2_000,
                               lo=0.25, hi=4.0, max_probes=8, bytes_per_doubling=150_000)
    assert result.fits and 1_098_000 <= result.bytes <= 1_100_000
    assert len(calls) <= 5 and result.multiplier < 1.0
    assert result.probes[0] == (1.0, linear_bytes(1.0))


def test_search_respects_its_bounds():
    finest = search_multiplier(linear_bytes, target=5_000_000, tolerance=1_000, lo=0.5, hi=4.0, max_probes=8,
                               bytes_per_doubling=150_000)
    assert finest.fits and finest.multiplier == pytest.approx(0.5)
    impossible = search_multiplier(linear_bytes, target=10_000, tolerance=1_000, lo=0.5, hi=4.0, max_probes=8,
                                   bytes_per_doubling=150_000)
    assert not impossible.fits and impossible.multiplier == pytest.approx(4.0)


def test_search_survives_a_non_monotone_measurement():
    def noisy(m: float) -> int:
        return linear_bytes(m) + (3_000 if 1.2 < m < 1.5 else 0)

    result = search_multiplier(noisy, target=960_000, tolerance=5_000, lo=0.25, hi=4.0, max_probes=10,
                               bytes_per_doubling=150_000)
    assert result.fits and result.bytes <= 960_000 and len(result.probes) <= 10


def test_target_mode_needs_sane_bounds_and_lambda_needs_gptq(micro_recipe):
    with pytest.raises(ConfigError, match="provides calibration batches; enable gptq"):
        Session(micro_recipe(techniques={"sdclip": {"hessian_lambda": 0.175}}), reporter=QUIET)
    with pytest.raises(ConfigError, match="hessian_damp"):
        Session(micro_recipe(techniques={"sdclip": {"hessian_damp": 0.0}}), reporter=QUIET)
    with pytest.raises(ConfigError, match="target_min_multiplier"):
        Session(micro_recipe(techniques={"sdclip": {"mode": "target", "target_min_multiplier": 2.0}}), reporter=QUIET)


@pytest.fixture(scope="module")
def trained_micro():
    return train_micro()


def export_with(micro_recipe, trained, techniques, *overrides):
    return export_micro(micro_recipe(*overrides, techniques=techniques), trained)


def test_target_mode_fits_a_real_artifact_under_the_budget(micro_recipe, trained_micro):
    fixed_session, fixed = export_with(micro_recipe, trained_micro, {"sdclip": {}})
    budget = fixed.info["bytes_total"] - 2_500  # k x 1 is too big by 2.5 KB
    session, exported = export_with(micro_recipe, trained_micro,
                                    {"sdclip": {"mode": "target", "target_tolerance_bytes": 1_500}},
                                    f"export.budget_bytes={budget}")
    metrics = technique(session, "sdclip").pgolf_contribute_metrics(session.ctx)
    assert metrics["sdclip_multiplier"] > 1.0 and metrics["sdclip_search_fits"]
    target = budget - 4096  # the default margin leaves room for the artifact's metadata header
    assert metrics["sdclip_target_bytes"] == target and target - 1_500 <= metrics["sdclip_search_bytes"] <= target
    assert exported.info["bytes_total"] <= budget  # the real export, metadata header included
    assert metrics["sdclip_probes"][0][0] == 1.0 and len(metrics["sdclip_probes"]) <= 8


def test_target_mode_with_gptq_reuses_the_factorisation(micro_recipe, trained_micro):
    fixed_session, fixed = export_with(micro_recipe, trained_micro, {"sdclip": {}, "gptq": {"calibration_batches": 2}})
    budget = fixed.info["bytes_total"] + 6_000  # room to spare: the search makes k finer
    session, exported = export_with(micro_recipe, trained_micro,
                                    {"sdclip": {"mode": "target", "target_tolerance_bytes": 1_000},
                                     "gptq": {"calibration_batches": 2}},
                                    f"export.budget_bytes={budget}")
    metrics = technique(session, "sdclip").pgolf_contribute_metrics(session.ctx)
    assert metrics["sdclip_multiplier"] < 1.0 and exported.info["bytes_total"] <= budget
    gptq = technique(session, "gptq")
    assert len(gptq._factors) == gptq.pgolf_contribute_metrics(session.ctx)["gptq_hessians"]


def model_bytes_without_header(session, artifact) -> int:
    """The real artifact's compressed model with its metadata header left out, as every search probe has it."""
    tensors, _ = decode_artifact(artifact.blob)
    export = session.recipe.export
    return len(encode_artifact(pack(tensors, {}), export.codec, export.level, export.byte_shuffle))


@pytest.mark.parametrize("gptq", [False, True])
def test_search_bytes_are_the_real_artifacts_counted_bytes(micro_recipe, trained_micro, gptq):
    """Each probe measures what exporting with that multiplier writes: the same tensors through the same
    codec, plus the code bytes (the metadata header alone left out, which target_margin_bytes covers).
    (Code bytes are taken from the one session: they are read from the source files when counted.)"""
    extra = {"gptq": {"calibration_batches": 2}} if gptq else {}
    fixed_session, fixed = export_with(micro_recipe, trained_micro, {"sdclip": {}, **extra})
    budget = fixed.info["bytes_total"] - 2_500
    session, searched = export_with(micro_recipe, trained_micro,
                                    {"sdclip": {"mode": "target", "target_tolerance_bytes": 1_500}, **extra},
                                    f"export.budget_bytes={budget}")
    metrics = technique(session, "sdclip").pgolf_contribute_metrics(session.ctx)
    m, code = metrics["sdclip_multiplier"], searched.info["bytes_code"]
    assert metrics["sdclip_search_bytes"] == model_bytes_without_header(session, searched) + code
    assert dict(metrics["sdclip_probes"])[1.0] == model_bytes_without_header(fixed_session, fixed) + code
    # the chosen multiplier, exported as a fixed k, is the searched artifact (every k is k x m)
    defaults = SDClipConfig()
    scaled = {f"{role}_sigmas": getattr(defaults, f"{role}_sigmas") * m for role in ("mlp", "attn", "matrix", "embed")}
    scaled_session, scaled_artifact = export_with(micro_recipe, trained_micro, {"sdclip": scaled, **extra})
    assert stored_tensors(scaled_artifact.blob) == stored_tensors(searched.blob)
    assert model_bytes_without_header(scaled_session, scaled_artifact) + code == metrics["sdclip_search_bytes"]


def test_hessian_aware_clip_reads_the_hosts_calibration_hessians(micro_recipe, trained_micro):
    gptq = {"gptq": {"calibration_batches": 2}}
    _, plain = export_with(micro_recipe, trained_micro, {"sdclip": {}, **gptq})
    session, aware = export_with(micro_recipe, trained_micro, {"sdclip": {"hessian_lambda": 0.175}, **gptq})
    assert aware.info["quant_notes"]["blocks.0.attn.c_q.weight"] == ["sdclip: k=13 hessian-aware"]
    assert stored_tensors(aware.blob) != stored_tensors(plain.blob)
    assert session.trace.stats["gptq"]["pgolf_provide_calibration_batches"].calls == 1  # collected once, shared

"""AWQ-lite: saliency from calibration activations, the global top-K groups, and both quantizers honouring
the spec's wide column groups (figures from #1908's `_awq_lite_group_candidates` / `gptq_quantize_weight`)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from pgolf.calibration import HessianCollector
from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf_plugins.awq_lite import AWQLiteConfig, activation_rms, group_saliency, protect, select_groups
from pgolf_plugins.gptq import factorize, gptq_quantize

# #1908 train_gpt.py lines 2352-2366 and 2196-2276, run on the tensors of `record_case` (torch 2.13 CPU):
# the best three 64-column groups (score to 4 places, start) and SHA-256 of (q, s, starts, s_hi) of the
# record's GPTQ at int6, k = 12.85, with the best group at int8 under the diagonal Hessian.
RECORD_TOP3 = [(1.6082, 256), (1.5767, 320), (1.564, 448)]
RECORD_GPTQ_DIAG = "5b42f6b741f2a1d01f805eaadf651ab5bb19528bc90fb4349ecf1559b15f93b6"


def record_case() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20240520)
    for shape in ((512, 4), (4, 2048), (8, 512), (8, 12)):  # the tensors drawn before, in the same scratch run
        torch.randn(*shape, generator=g)
    return torch.randn(256, 512, generator=g) * 0.04, torch.rand(512, generator=g) + 0.1


def sigma_spec(bits: int = 6) -> QuantSpec:
    return QuantSpec("int", bits=bits, clip="sigmas", clip_sigmas=12.85, scale_floor=1e-10)


def test_saliency_and_the_protected_gptq_match_the_record():
    w, d = record_case()
    top = sorted(group_saliency(w, d.sqrt(), 64), key=lambda c: -c[0])[:3]
    assert [(round(s, 4), start) for s, start in top] == RECORD_TOP3
    spec = sigma_spec()
    chosen = protect({"w": spec}, {"w": w}, {"w": torch.diag(d)}, AWQLiteConfig())
    assert chosen == {"w": [256]} and (spec.col_groups, spec.col_group_size, spec.col_group_bits) == ([256], 64, 8)
    qt = gptq_quantize(w, factorize(torch.diag(d)), spec)
    h = hashlib.sha256()
    for key in ("q", "scale", "col_start", "col_scale"):
        t = qt.parts[key]
        h.update((t.view(torch.int16) if t.dtype == torch.float16 else t).numpy().tobytes())
    assert h.hexdigest() == RECORD_GPTQ_DIAG
    assert qt.parts["q"][:, 256:320].abs().max() > 31 >= qt.parts["q"][:, :256].abs().max()


def test_activation_rms_is_the_root_mean_square_of_each_input_column():
    torch.manual_seed(0)
    layer = nn.Linear(16, 4, bias=False)
    x = torch.randn(3, 50, 16) * torch.linspace(0.1, 2.0, 16)
    with HessianCollector(nn.Sequential(layer)) as collector:
        layer(x)
    (name,) = collector.hessians
    mean_h = collector.hessians[name] / collector.rows[name]
    torch.testing.assert_close(activation_rms(mean_h), x.reshape(-1, 16).pow(2).mean(0).sqrt())


def test_groups_are_chosen_across_tensors_and_only_where_they_widen_the_codes():
    assert select_groups([(1.0, "a", 0), (3.0, "b", 64), (2.0, "a", 64), (3.0, "c", 0)], 3) == {
        "b": [64], "c": [0], "a": [64]}
    g = torch.Generator().manual_seed(3)
    state = {n: torch.randn(32, 128, generator=g) for n in ("int6", "int8", "no_hessian")}
    state["int6"][:, 64:] *= 3  # the salient half
    specs = {"int6": sigma_spec(6), "int8": sigma_spec(8), "no_hessian": sigma_spec(6)}
    hessians = {n: torch.eye(128) for n in ("int6", "int8")}
    assert protect(specs, state, hessians, AWQLiteConfig(group_top_k=2)) == {"int6": [64, 0]}
    assert specs["int8"].col_groups == [] and specs["no_hessian"].col_groups == []


def test_round_to_nearest_and_gptq_store_the_same_wide_groups():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 256, generator=g)
    spec = sigma_spec()
    spec.col_groups, spec.col_group_size, spec.col_group_bits, spec.fp16_scale = [128], 64, 8, True
    rtn, gptq = quantize_rtn("w", w, spec), gptq_quantize(w, factorize(torch.eye(256)), spec)
    for key in ("q", "scale", "col_start", "col_scale"):
        assert torch.equal(rtn.parts[key], gptq.parts[key]), key
    back = dequantize(rtn)
    err = (back - w).abs()
    assert err[:, 128:192].mean() < 0.25 * err[:, :128].mean()  # int8 steps are 4x finer than int6

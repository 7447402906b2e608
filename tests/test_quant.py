"""Export: the baseline's int8 rule, passthrough rules, artifact container and codecs (code bytes:
tests/test_submission_export.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.artifact import decode_artifact, encode_artifact, pack, unpack
from pgolf.codecs import CODECS, byte_shuffle, byte_unshuffle, compress, decompress
from pgolf.errors import DataError
from pgolf.quant import QuantSpec, default_spec, dequantize, qmax, quantize_rtn
from pgolf.recipe import ExportConfig

CFG = ExportConfig()


def baseline_int8_row(w: torch.Tensor) -> torch.Tensor:
    """The challenge rule written out independently: percentile clip, 1/127 floor, fp16 scale."""
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)
    clipped = torch.max(torch.min(w, clip[:, None]), -clip[:, None])
    scale = (clip / 127.0).clamp_min(1.0 / 127.0)
    q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127)
    return q * scale.half().float()[:, None]


def test_matrices_get_the_baseline_int8_per_row_rule():
    torch.manual_seed(0)
    w = torch.randn(300, 400) * 0.05
    w[7] *= 1e-4  # a row under the 1/127 scale floor
    w[3, 5] = 2.0  # an outlier the percentile clips
    qt = quantize_rtn("blocks.0.mlp.fc.weight", w, default_spec("blocks.0.mlp.fc.weight", w, CFG))
    assert qt.kind == "int_rows" and qt.parts["q"].dtype == torch.int8 and qt.parts["scale"].dtype == torch.float16
    torch.testing.assert_close(dequantize(qt), baseline_int8_row(w), rtol=0, atol=0)


def test_passthrough_rules():
    control = torch.randn(512)
    small = torch.randn(100, 100)
    ints = torch.arange(10)
    assert default_spec("blocks.0.attn_scale", control, CFG).scheme == "fp32"
    assert default_spec("blocks.0.attn.q_gain", control[:8], CFG).scheme == "fp32"
    assert default_spec("some.small.weight", small, CFG).scheme == "fp16"
    assert default_spec("steps", ints, CFG).scheme == "raw"
    assert default_spec("big", torch.randn(300, 300), CFG).scheme == "int"
    back = dequantize(quantize_rtn("some.small.weight", small, default_spec("some.small.weight", small, CFG)))
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, small.half().float())


def test_small_floats_follow_the_baseline_or_the_records():
    control, small = torch.randn(512), torch.randn(100, 100)
    records = ExportConfig(keep_control_fp32=False)  # #1530-#2135 gptq_mixed_quantize: every small float in fp16
    assert default_spec("blocks.0.attn_scale", control, records).scheme == "fp16"
    assert default_spec("some.small.weight", small, records).scheme == "fp16"
    full = ExportConfig(small_float_dtype="fp32")
    assert default_spec("blocks.0.attn_scale", control, full).scheme == "fp32"
    assert default_spec("some.small.weight", small, full).scheme == "fp32"
    assert default_spec("big", torch.randn(300, 300), full).scheme == "int"


def test_symmetric_codes_never_leave_the_range():
    w = torch.randn(64, 256)
    for bits in (5, 6, 7, 8):
        spec = QuantSpec("int", bits=bits, clip="none")
        q = quantize_rtn("w", w, spec).parts["q"]
        assert q.abs().max().item() <= qmax(bits) and q.min().item() >= -qmax(bits)


def test_round_to_nearest_error_bound_for_unclipped_entries():
    w = torch.randn(32, 128)
    spec = QuantSpec("int", bits=6, clip="none", scale_floor=1e-10)
    qt = quantize_rtn("w", w, spec)
    scale = qt.parts["scale"].float()[:, None]
    err = (dequantize(qt) - w).abs()
    # scales are stored in fp16, so allow that rounding on top of half a step
    assert (err <= scale / 2 + w.abs() * 1e-3 + 1e-6).all()


def test_sigma_clip_and_row_groups():
    torch.manual_seed(1)
    w = torch.randn(16, 512)
    spec = QuantSpec("int", bits=6, clip="sigmas", clip_sigmas=3.0, scale_floor=1e-10)
    spec.row_groups.append((torch.tensor([0, 5]), 8))
    qt = quantize_rtn("w", w, spec)
    assert qt.parts["row_bits"].tolist()[:6] == [8, 6, 6, 6, 6, 8]
    s = qt.parts["scale"].float()
    torch.testing.assert_close(s[1], (3.0 * w[1].std() / 31).half().float())
    torch.testing.assert_close(s[0], (3.0 * w[0].std() / 127).half().float())


def test_artifact_round_trip_preserves_every_dtype():
    tensors = {
        "a": quantize_rtn("a", torch.randn(300, 300), QuantSpec("int")),
        "b": quantize_rtn("b", torch.randn(5), QuantSpec("fp16")),
        "c": quantize_rtn("c", torch.arange(7), QuantSpec("raw")),
        "d": quantize_rtn("d", torch.randn(4, 4).bfloat16(), QuantSpec("raw")),
        "e": quantize_rtn("e", torch.tensor([True, False]), QuantSpec("raw")),
    }
    meta = {"recipe": {"name": "x"}, "n": 3}
    for codec in CODECS:
        for shuffle in (0, 2):
            blob = encode_artifact(pack(tensors, meta), codec, None, shuffle)
            back, meta2 = decode_artifact(blob)
            assert meta2 == meta
            for name, qt in tensors.items():
                for key, t in qt.parts.items():
                    assert back[name].parts[key].dtype == t.dtype
                    assert torch.equal(back[name].parts[key], t)


def test_artifact_is_not_a_pickle_and_rejects_garbage():
    payload = pack({"x": quantize_rtn("x", torch.randn(3), QuantSpec("fp32"))}, {})
    assert payload.startswith(b"PGQ1") and b"torch" not in payload[:64]
    with pytest.raises(DataError, match="bad magic"):
        decode_artifact(b"PK\x03\x04" + b"\x00" * 20)
    with pytest.raises(DataError, match="bad magic"):
        unpack(b"XXXX" + b"\x00" * 8)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_byte_shuffle_round_trip(stride):
    data = bytes(range(256)) * 3 + b"tail!"
    shuffled = byte_shuffle(data, stride)
    assert shuffled != data and byte_unshuffle(shuffled, stride) == data


def test_codecs_round_trip_and_brotli_beats_zlib_on_int8_codes():
    rng = np.random.default_rng(0)
    codes = np.clip(np.round(rng.normal(0, 8, 200_000)), -31, 31).astype(np.int8).tobytes()
    sizes = {}
    for codec in CODECS:
        blob = compress(codes, codec)
        assert decompress(blob, codec) == codes
        sizes[codec] = len(blob)
    assert sizes["brotli"] < sizes["zlib"]

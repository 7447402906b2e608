"""LQER: the records' factor packing (figures from #1855's `_lqer_pack_asym` / `_lqer_pack`), the top-K
choice across tensors, and the stored tensor's round trip through the artifact container."""

from __future__ import annotations

import hashlib

import torch

from pgolf.artifact import pack, unpack
from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf_plugins.lqer import LQERConfig, correct_top_k, correction, fit, pack_asym, pack_sym, rank_by_error

# SHA-256 of (qA, sA, qB, sB) from the record's functions (#1855 train_gpt.py lines 2197-2217) on the
# factors below, torch 2.13 CPU.
RECORD_ASYM = {64: "77e3c20f2cc33a6ca4b1377c0d956a623c0a8c2836b1b2b61550b02f6a4f92f0",
               32: "efcb19eda0b7b4744c13ddac9129a6c142244617c40968494446509427ba84d8"}
RECORD_SYM4 = "f213ac5f102bf83fdd2cdb10cd48146d2ec1cf1ae82156bc56ddc64a55291b75"


def sha(parts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in ("qA", "sA", "qB", "sB"):
        t = parts[key].contiguous()
        h.update((t.view(torch.int16) if t.dtype == torch.float16 else t).numpy().tobytes())
    return h.hexdigest()


def factors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20240520)
    return torch.randn(512, 4, generator=g) * 0.02, torch.randn(4, 2048, generator=g) * 0.03


def test_packing_matches_the_record_byte_for_byte():
    a, b = factors()
    for group, expected in RECORD_ASYM.items():
        packed = pack_asym(a, b, group)
        assert sha(packed) == expected
        assert packed["qA"].min() >= -2 and packed["qA"].max() <= 1 and packed["qB"].abs().max() <= 8
        assert packed["sA"].dtype == torch.float16 and packed["sB"].numel() == b.numel() // group
    assert sha(pack_sym(a, b, 4)) == RECORD_SYM4


def test_a_low_rank_error_is_mostly_corrected_and_odd_sizes_fall_back_to_symmetric():
    g = torch.Generator().manual_seed(1)
    error = torch.randn(96, 4, generator=g) @ torch.randn(4, 128, generator=g)
    mode, parts = fit(error, LQERConfig(rank=4, group=64))
    assert mode == "asym"
    assert (error - correction(parts, mode)).norm() < 0.6 * error.norm()  # INT2 A is coarse, still a gain
    mode, parts = fit(error[:, :100], LQERConfig(rank=4, group=64))  # 4 x 100 factors: not a multiple of 64
    assert mode == "sym" and parts["sB"].shape == (4,)
    assert (error[:, :100] - correction(parts, mode)).norm() < 0.3 * error.norm()


def test_top_k_is_global_by_error_norm_and_skips_exact_tensors():
    assert rank_by_error({"a": 1.0, "b": 3.0, "c": 2.0, "d": 3.0}, 3) == ["b", "d", "c"]
    assert rank_by_error({"a": 0.0, "b": 1.0}, 3) == ["b"]


def test_corrected_tensors_survive_the_container_and_lower_the_error():
    g = torch.Generator().manual_seed(2)
    state = {f"m{i}": torch.randn(64, 128, generator=g) * (i + 1) for i in range(4)}
    state["small"] = torch.randn(8, 8, generator=g)
    spec = QuantSpec("int", bits=4, clip="none")
    tensors = {n: quantize_rtn(n, t, spec) for n, t in state.items()}
    before = {n: float((state[n] - dequantize(qt)).norm()) for n, qt in tensors.items()}
    chosen = correct_top_k(tensors, state, LQERConfig(top_k=2, rank=4, group=64), min_numel=100)
    assert list(chosen) == ["m3", "m2"]  # the largest errors; 'small' is not a candidate
    assert tensors["m1"].kind == "int_rows" and tensors["m3"].kind == "lqer"
    back, _ = unpack(pack(tensors, {}))
    for name in chosen:
        w = dequantize(back[name])
        assert w.dtype == torch.float32 and float((state[name] - w).norm()) < before[name]
        torch.testing.assert_close(w, dequantize(tensors[name]), rtol=0, atol=0)

"""QuantGate: which tensors it routes (#1736 / #1855) and the record's int8-per-row bytes."""

from __future__ import annotations

import hashlib

import torch

from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf_plugins.quant_gate import QuantGateConfig, gate_spec, is_gate

# SHA-256 of (q, scale) from #1855's `_quantize_gate_int8_row` (train_gpt.py lines 2185-2194) on the dense
# (8 x 512) and sparse (8 x 12) gates of `record_gates`, torch 2.13 CPU.
RECORD_DENSE = "1e79abbaa0c3b23a5a0683718bc142e9e3dda9b58e907445506d1e3a87a99e73"
RECORD_SPARSE = "fa42149c42e0da45f2c8ac2cfa1566dcda09c167701100558de55aab3b77cf69"


def record_gates() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20240520)
    torch.randn(512, 4, generator=g), torch.randn(4, 2048, generator=g)  # drawn first in the scratch run
    return torch.randn(8, 512, generator=g) * 0.05, torch.randn(8, 12, generator=g) * 0.5


def gate_bytes(w: torch.Tensor) -> tuple[str, torch.Tensor]:
    spec = QuantSpec("fp16")
    gate_spec(spec)
    qt = quantize_rtn("blocks.0.attn.attn_gate_w", w, spec)
    h = hashlib.sha256(qt.parts["q"].numpy().tobytes() + qt.parts["scale"].view(torch.int16).numpy().tobytes())
    return h.hexdigest(), dequantize(qt)


def test_gates_are_stored_as_the_record_stores_them():
    dense, sparse = record_gates()
    for w, expected in ((dense, RECORD_DENSE), (sparse, RECORD_SPARSE)):
        digest, back = gate_bytes(w)
        assert digest == expected
        assert (back - w).abs().max() <= w.abs().amax(dim=1).max() / 127 / 2 * 1.01


def test_routing_by_name_and_size():
    cfg = QuantGateConfig()
    assert is_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 12), cfg)  # the sparse gate (#1855)
    assert is_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 1024), cfg)  # 8,192: the upper bound
    assert not is_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 1025), cfg)
    assert not is_gate("blocks.3.attn.attn_gate_w", torch.zeros(1, 31), cfg)
    assert not is_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 12, dtype=torch.int64), cfg)
    assert not is_gate("blocks.3.attn.attn_gate_proj.weight", torch.zeros(8, 12), cfg)
    assert not is_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 12), QuantGateConfig(min_numel=1024))  # #1736


def test_an_all_zero_gate_row_stays_zero():
    w = torch.randn(4, 64)
    w[2] = 0  # a zero-initialised gate row that never trained
    digest, back = gate_bytes(w)
    assert torch.equal(back[2], torch.zeros(64)) and torch.isfinite(back).all()

"""The final records' export, byte for byte: GPTQ + AWQ-lite + LQER + QuantGate + fp16 passthrough.

The figures are SHA-256 digests of the records' own `gptq_mixed_quantize` output (#1908's train_gpt.py,
which carries #1855's LQER asym and gate paths plus AWQ-lite), run on CPU on the fixed random state below
with diagonal Hessians (so GPTQ's error feedback is exactly zero and the codes are pure roundings), with
hparams embed_bits 7, matrix_bits 6, clip sigmas 15/12/13, AWQ_LITE top 1 x 64 at int8, LQER rank 4 top 3
at asym group 64 (#1855) and 32 (#2060/#2135), GATED_ATTN_QUANT_GATE=1. Each digest covers, in order, a
tensor's codes, scales, AWQ group starts and wide scales, then LQER's qA, sA, qB, sB (the record's int16
group-size scalar is a metadata field here).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from pgolf.quant import QuantSpec, default_spec, quantize_rtn
from pgolf.recipe import ExportConfig
from pgolf_plugins.awq_lite import AWQLiteConfig, protect
from pgolf_plugins.gptq import factorize, gptq_quantize
from pgolf_plugins.lqer import LQERConfig, correct_top_k
from pgolf_plugins.quant_gate import QuantGateConfig, gate_spec, is_gate
from pgolf_plugins.sdclip import apply_sdclip
from tests.conftest import pinned_threads

SHAPES = {"tok_emb.weight": (1024, 256), "blocks.0.attn.c_q.weight": (384, 256), "blocks.0.attn.attn_gate_w": (8, 256),
          "blocks.0.attn_scale": (256,), "blocks.0.mlp.fc.weight": (1024, 256), "blocks.0.mlp.proj.weight": (256, 1024)}
SIGMAS = {"tok_emb.weight": 15.0, "blocks.0.attn.c_q.weight": 13.0, "blocks.0.mlp.fc.weight": 12.0,
          "blocks.0.mlp.proj.weight": 12.0}
PART_ORDER = ("data", "q", "scale", "col_start", "col_scale", "lqer_qA", "lqer_sA", "lqer_qB", "lqer_sB")
# scratch run of the record's functions (#1908 train_gpt.py lines 2045-2470) on this state, torch 2.13 CPU
RECORD = {
    64: {"tok_emb.weight": "975661ce102d919004a55a731e024e09e443733e2137c53378d5f8234a3cacb9",
         "blocks.0.attn.c_q.weight": "92afaf8359b82dea3cdb0e3af93d37266dd7b9057bbd777bb3b1101eb48cc4fb",
         "blocks.0.attn.attn_gate_w": "7c92f7c8226649b7f01b197a4fb567b7a03971f5bfc73311e0865ddf8edec969",
         "blocks.0.attn_scale": "4dfee0102a003f792f4866d0afbf011f8109a516aba09c07a98e54366da0c2d9",
         "blocks.0.mlp.fc.weight": "84300a530e05abf99efd8bfdc14c1630252a65f9f4c020d3dbcda3ab14414258",
         "blocks.0.mlp.proj.weight": "62088ee82b3c4f3af9308c6f9e1c401830986aee5debae3f61fa3ff6e4ed8aa3"},
    32: {"tok_emb.weight": "975661ce102d919004a55a731e024e09e443733e2137c53378d5f8234a3cacb9",
         "blocks.0.attn.c_q.weight": "b90a840045511218bf55ca6b95d19cb51dee9607c932d4526751f5c03ac08007",
         "blocks.0.attn.attn_gate_w": "7c92f7c8226649b7f01b197a4fb567b7a03971f5bfc73311e0865ddf8edec969",
         "blocks.0.attn_scale": "4dfee0102a003f792f4866d0afbf011f8109a516aba09c07a98e54366da0c2d9",
         "blocks.0.mlp.fc.weight": "c9e861207a552aa214ca1a78162356932b0d6cd5af43c32414c341b71400e671",
         "blocks.0.mlp.proj.weight": "9dc8e45cd6b20b8c97581b0d9c3abcb98841a4ebb9df3fa111178f5f2410db82"},
}
RECORD_AWQ_START = 960  # the record picked proj's last 64-column group
RECORD_KINDS = {"blocks.0.attn.c_q.weight", "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight"}  # +lqer_asym


def digest(parts: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in PART_ORDER:
        if key in parts:
            t = parts[key].contiguous()
            h.update((t.view(torch.int16) if t.dtype == torch.float16 else t).numpy().tobytes())
    return h.hexdigest()


def record_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1855)
    state = {n: torch.randn(*s, generator=g) * (0.05 if len(s) == 2 else 1.0) for n, s in SHAPES.items()}
    hessians = {n: torch.diag(torch.rand(t.shape[1], generator=g) + 0.05)
                for n, t in state.items() if t.ndim == 2 and t.numel() > 65536}
    return state, hessians


@pytest.mark.parametrize("group", [64, 32])
def test_the_final_records_export_is_reproduced_byte_for_byte(group):
    with pinned_threads():  # the record's figures were taken on one thread
        reproduce(group)


def reproduce(group: int) -> None:
    state, hessians = record_inputs()
    cfg = ExportConfig(keep_control_fp32=False)  # the records store control tensors in fp16 too
    specs: dict[str, QuantSpec] = {}
    for name, t in state.items():
        specs[name] = spec = default_spec(name, t, cfg)
        if spec.scheme == "int":
            spec.bits = 7 if name.startswith("tok_emb") else 6
            apply_sdclip(spec, SIGMAS[name])
        if is_gate(name, t, QuantGateConfig()):
            gate_spec(spec)
    chosen = protect(specs, state, hessians, AWQLiteConfig())
    assert chosen == {"blocks.0.mlp.proj.weight": [RECORD_AWQ_START]}
    tensors = {name: gptq_quantize(t, factorize(hessians[name]), specs[name]) if name in hessians
               else quantize_rtn(name, t, specs[name]) for name, t in state.items()}
    corrected = correct_top_k(tensors, state, LQERConfig(group=group), min_numel=65536)
    assert set(corrected) == RECORD_KINDS
    assert {n: digest(qt.parts) for n, qt in tensors.items()} == RECORD[group]

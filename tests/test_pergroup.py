"""The pergroup codec (#1855): the records' grouping and row order, exact round trips, named coders.

Real coders throughout (brotli always; lrzip and the zpaq binding where installed). The record
figures below come from running #1855's `_serialize_pergroup` and #2135's `_pack_pergroup`
themselves on `record_codes()` with their lrzip call replaced by a capture of its input.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pgolf.artifact import BODY_OFFSET, decode_artifact, encode_artifact, int8_matrices, pack
from pgolf.codecs import (
    CODEC_IDS,
    arrange_groups,
    coder_available,
    decompress,
    group_matrices,
    nearest_neighbour_order,
    resolve_coder,
)
from pgolf.errors import ConfigError, DataError
from pgolf.quant import QuantizedTensor, QuantSpec, quantize_rtn
from pgolf.recipe import ExportConfig
from pgolf_plugins.codec import CodecConfig, configure_export

SHAPES = {"attn.c_q.weight": (16, 16), "attn.c_k.weight": (8, 16), "attn.c_v.weight": (8, 16),
          "attn.proj.weight": (16, 16), "mlp.fc.weight": (32, 16), "mlp.proj.weight": (16, 32)}

# #1855 train_gpt.py `_serialize_pergroup` (L2448-2506): SHA-256 of each group's bytes as handed to
# `_lrzip_compress`, in `_GROUP_ORDER`, and of the uint16 permutations before their brotli.
RECORD_1855_GROUPS = {
    "tok_emb.weight": "fc2eb35a52a7f327e1f98e03c371c43ed011ac50b47bd7d4edb81ac0352f51a2",
    "attn.c_k.weight": "515aafcbf9607dbd7471e15be6539fae17bf49943db173d16075344ee5c7f752",
    "attn.c_q.weight": "7917384fb17ac58987b04ca8d0ab2946a93a61dcd9b194686ce1d58dc11205f4",
    "attn.c_v.weight": "4645dd246e06f0b6b6594156ae56136c943808f0d7271378d9da7f87001de570",
    "attn.proj.weight": "e1868586bb056b98e7091dbccb268f92a157a72aebc75c34f2ee16772738d6e4",
    "mlp.fc.weight": "e2baa6201f84bf8ca20e018846bf73fa953908807bfc4241137975863788a992",
    "mlp.proj.weight": "5221f334a1f7395ca9f82116e53bbf0f47014ad061eb83acdd9d9459fe27e15a",
}
RECORD_1855_PERMS = "d0dce354033f58cf397ab2b21728ea393447c2d0bbe6965cd4e1a386ea4e36dd"
# #1855 `_similarity_sort_l1` (L2364) on tok_emb's codes: the row order it stores first.
RECORD_1855_TOK_EMB_ORDER = [0, 4, 8, 12, 16, 20, 11, 7, 3, 23, 19, 15, 10, 14, 18, 22, 2, 6, 1, 5, 9, 13, 17, 21]
# #2135 train_gpt.py `_pack_pergroup` (L2754-2850): the one Q blob handed to lrzip, and its frame's permutations.
RECORD_2135_Q = "29ad5a06573c813f5a5e2e92e47dac1c151d47e03df144210de5f74284b4e970"
RECORD_2135_PERMS = "8b28d188f9168aeeac0b582b62077a1fc2697b07ae1ab69027b9c28e74cfaa69"


def fixed_codes(rows: int, cols: int, salt: int) -> np.ndarray:
    """int8 codes from integer arithmetic alone (no RNG whose stream could change): row clusters plus noise."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    noise = ((i * 7919 + j * 104729 + salt * 15485863) * 2654435761 % 4294967296) >> 29
    pattern = (j * (i % 4 + 1) + salt) % 11 - 5
    return (pattern + noise - 3).astype(np.int8)


def record_codes() -> dict[str, np.ndarray]:
    """A 2-layer state in the records' key order: tok_emb, then each layer's six roles, and a gate's int8 rows."""
    out = {"tok_emb.weight": fixed_codes(24, 16, 1)}
    salt = 2
    for layer in range(2):
        for role, (rows, cols) in SHAPES.items():
            out[f"blocks.{layer}.{role}"] = fixed_codes(rows, cols, salt)
            salt += 1
    out["blocks.0.attn.attn_gate_w"] = fixed_codes(8, 12, 99)  # int8 but no role: stays in the rest
    return out


def fixed_tensors() -> dict[str, QuantizedTensor]:
    tensors = {}
    for name, codes in record_codes().items():
        rows, cols = codes.shape
        scale = torch.linspace(0.01, 0.02, rows).half()
        tensors[name] = QuantizedTensor("int_rows", (rows, cols), "float32",
                                        {"q": torch.from_numpy(codes.copy()), "scale": scale})
    tensors["blocks.0.attn_scale"] = quantize_rtn("blocks.0.attn_scale", torch.linspace(-1, 1, 16), QuantSpec("fp16"))
    return tensors


@pytest.fixture(scope="module")
def payload() -> bytes:
    return pack(fixed_tensors(), {"recipe": {"name": "pergroup"}})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_roles_layout_gives_the_records_groups_row_order_and_bytes(payload):
    groups = group_matrices(int8_matrices(payload), "roles")
    assert [role for role, _ in groups] == list(RECORD_1855_GROUPS)
    assert [m.name for m, _ in groups[2][1]] == ["blocks.0.attn.c_q.weight", "blocks.1.attn.c_q.weight"]
    assert {role for role, members in groups if all(r for _, r in members)} == {
        "tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight"}
    raw, perms = arrange_groups(payload, groups)
    assert {role: sha(b) for (role, _), b in zip(groups, raw, strict=True)} == RECORD_1855_GROUPS
    assert sha(perms) == RECORD_1855_PERMS
    assert nearest_neighbour_order(record_codes()["tok_emb.weight"]).tolist() == RECORD_1855_TOK_EMB_ORDER


def test_single_layout_gives_the_2135_blob(payload):
    groups = group_matrices(int8_matrices(payload), "single")
    assert len(groups) == 1 and len(groups[0][1]) == 13 and all(r for _, r in groups[0][1])
    raw, perms = arrange_groups(payload, groups)
    assert (sha(raw[0]), sha(perms)) == (RECORD_2135_Q, RECORD_2135_PERMS)


def test_nearest_neighbour_ties_go_to_the_lowest_row():
    rows = np.array([[0], [2], [1], [1], [9]], dtype=np.int8)  # from row 0, rows 2 and 3 are both 1 away
    assert nearest_neighbour_order(rows).tolist() == [0, 2, 3, 1, 4]


# lrzip runs once per group and direction (a second or more each, mostly start-up): its one-group layout only.
CASES = [pytest.param(c, layout, marks=pytest.mark.skipif(not coder_available(c), reason=f"{c} is not installed"))
         for c, layout in [("brotli", "roles"), ("brotli", "single"), ("zpaq", "roles"), ("zpaq", "single"),
                           ("lrzip", "single")]]


@pytest.mark.parametrize(("coder", "layout"), CASES)
def test_round_trip_is_exact_and_encoding_deterministic(payload, coder, layout):
    blob = encode_artifact(payload, "pergroup", None, 2, coder, layout)
    assert blob[4] == CODEC_IDS["pergroup"] and blob[5] == 2
    assert decompress(blob[BODY_OFFSET:], "pergroup", 2) == payload
    assert encode_artifact(payload, "pergroup", None, 2, coder, layout) == blob
    tensors, meta = decode_artifact(blob)
    assert meta == {"recipe": {"name": "pergroup"}}
    for name, qt in fixed_tensors().items():
        for key, t in qt.parts.items():
            assert tensors[name].parts[key].dtype == t.dtype and torch.equal(tensors[name].parts[key], t)


def test_a_damaged_group_stream_is_a_data_error(payload):
    blob = bytearray(encode_artifact(payload, "pergroup", None, 2, "brotli", "roles"))
    for pos in (len(blob) - 40, len(blob) - 400, BODY_OFFSET + 2):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(DataError, match="corrupt or truncated"):
            decode_artifact(bytes(bad))
    with pytest.raises(DataError, match="corrupt or truncated"):
        decode_artifact(bytes(blob[:-7]))


@pytest.mark.skipif(not coder_available("lrzip"), reason="lrzip is not installed")
def test_a_missing_decoder_names_what_to_install(payload, monkeypatch):
    blob = encode_artifact(payload, "pergroup", None, 2, "lrzip", "single")
    monkeypatch.setenv("PATH", "")  # lrzip is now nowhere to be found, as on a machine without it
    with pytest.raises(DataError, match="coded with lrzip, which is not installed.*apt-get install lrzip"):
        decode_artifact(blob)
    with pytest.raises(ConfigError, match="lrzip is not installed"):
        resolve_coder("lrzip")
    assert resolve_coder("auto") == ("zpaq" if coder_available("zpaq") else "brotli")


def test_the_technique_writes_the_resolved_coder_and_layout():
    export = ExportConfig()
    configure_export(export, CodecConfig(codec="pergroup", coder="brotli", layout="single"))
    assert (export.codec, export.level, export.byte_shuffle, export.group_coder, export.group_layout) == (
        "pergroup", 11, 2, "brotli", "single")
    configure_export(export, CodecConfig(codec="pergroup"))
    assert export.group_coder == resolve_coder("auto") != "auto" and export.group_layout == "roles"

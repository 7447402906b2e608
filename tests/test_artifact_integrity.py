"""A damaged artifact is a `DataError`, never a traceback and never silently different weights.

Real bytes throughout: small artifacts built with `pack` + `encode_artifact` for every codec,
then truncated, bit-flipped or replaced with garbage. zlib and xz carry their own checksums;
brotli does not, so for brotli the payload's SHA-256 is what notices a flip it decodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch

from pgolf.artifact import BODY_OFFSET, DIGEST_SIZE, FILE_MAGIC, PAYLOAD_MAGIC, decode_artifact, encode_artifact, pack
from pgolf.codecs import CODEC_IDS, CODECS, decompress
from pgolf.errors import DataError
from pgolf.quant import QuantSpec, quantize_rtn

CORRUPT = "corrupt or truncated"


def small_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": quantize_rtn("w", torch.randn(16, 32, generator=g), QuantSpec("int")),
        "b": quantize_rtn("b", torch.randn(8, generator=g), QuantSpec("fp16")),
        "i": quantize_rtn("i", torch.arange(5), QuantSpec("raw")),
    }


META = {"recipe": {"name": "integrity"}, "bos_id": 1}


@pytest.fixture(scope="module")
def payload() -> bytes:
    return pack(small_tensors(), META)


def blob_for(payload: bytes, codec: str) -> bytes:
    return encode_artifact(payload, codec, None, 2)


def assert_same(decoded: tuple, expected: dict) -> None:
    tensors, meta = decoded
    assert meta == META and tensors.keys() == expected.keys()
    for name, qt in expected.items():
        assert tensors[name].kind == qt.kind and tensors[name].meta == qt.meta
        for key, t in qt.parts.items():
            assert tensors[name].parts[key].dtype == t.dtype and torch.equal(tensors[name].parts[key], t)


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_stores_the_payload_digest_and_decodes_the_same_tensors(payload, codec):
    blob = blob_for(payload, codec)
    assert blob[:4] == FILE_MAGIC == b"PGA2" and blob[4] == CODEC_IDS[codec] and blob[5] == 2
    assert blob[6:BODY_OFFSET] == hashlib.sha256(payload).digest() and DIGEST_SIZE == 32
    assert decompress(blob[BODY_OFFSET:], codec, 2) == payload
    assert_same(decode_artifact(blob), small_tensors())


@pytest.mark.parametrize("codec", CODECS)
def test_every_truncation_is_a_data_error(payload, codec):
    blob = blob_for(payload, codec)
    for cut in range(len(blob)):  # inside the magic, the codec bytes, the digest and the body
        with pytest.raises(DataError, match=CORRUPT if cut > 4 else "bad magic|corrupt"):
            decode_artifact(blob[:cut])


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_bit_in_the_checksum_is_a_data_error(payload, codec):
    blob = blob_for(payload, codec)
    for pos in range(6, BODY_OFFSET):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(DataError, match="SHA-256 .* does not match"):
                decode_artifact(bytes(bad))


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_bit_in_the_body_is_a_data_error_unless_the_codec_ignores_that_bit(payload, codec):
    """Every single-bit flip of the compressed body: a `DataError`, or (a handful of header and
    padding bits the codec does not read, such as deflate's last-byte padding or brotli's window
    size on a small input) exactly the original tensors: never different weights."""
    blob = blob_for(payload, codec)
    expected = small_tensors()
    caught = by_checksum = harmless = 0
    for pos in range(BODY_OFFSET, len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            try:
                decoded = decode_artifact(bytes(bad))
            except DataError as exc:
                assert CORRUPT in str(exc)
                caught += 1
                by_checksum += "SHA-256" in str(exc)
            else:
                assert decompress(bytes(bad[BODY_OFFSET:]), codec, 2) == payload
                assert_same(decoded, expected)
                harmless += 1
    flips = 8 * (len(blob) - BODY_OFFSET)
    assert caught + harmless == flips and harmless <= flips // 100
    if codec == "brotli":  # no checksum of its own: these flips decode, to different bytes
        assert by_checksum > flips // 4


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_bit_in_the_magic_or_codec_byte_is_a_data_error(payload, codec):
    blob = blob_for(payload, codec)
    for pos in range(5):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(DataError, match="bad magic|corrupt"):
                decode_artifact(bytes(bad))


def test_garbage_empty_and_legacy_files_are_data_errors():
    with pytest.raises(DataError, match="bad magic"):
        decode_artifact(os.urandom(4096))
    with pytest.raises(DataError, match="bad magic"):
        decode_artifact(b"")
    for codec in CODECS:
        with pytest.raises(DataError, match=CORRUPT):
            decode_artifact(FILE_MAGIC + bytes([CODEC_IDS[codec], 0]) + os.urandom(DIGEST_SIZE + 500))
    with pytest.raises(DataError, match="unknown codec|known codecs"):
        decode_artifact(FILE_MAGIC + bytes([len(CODECS), 0]) + bytes(DIGEST_SIZE + 10))
    with pytest.raises(DataError, match="older PGA1 layout"):
        decode_artifact(b"PGA1" + bytes([0, 0]) + b"x" * 100)


def raw_payload(header: dict | bytes, data: bytes = b"") -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PAYLOAD_MAGIC + struct.pack("<I", len(head)) + head + data


def part(**over) -> dict:
    return {"key": "v", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8, **over}


def tensor(*parts: dict) -> dict:
    return {"name": "t", "kind": "raw", "shape": [2], "dtype": "float32", "meta": {}, "parts": list(parts)}


@pytest.mark.parametrize(("payload_bytes", "match"), [
    (b"XXXX" + bytes(40), "bad magic"),
    (PAYLOAD_MAGIC + b"\x01", "preamble"),
    (PAYLOAD_MAGIC + struct.pack("<I", 10_000) + b"{}", "header claims"),
    (raw_payload(b"{not json"), "not valid JSON"),
    (raw_payload(b"\xff\xfe"), "not valid JSON"),
    (raw_payload({"tensors": []}), "lacks"),
    (raw_payload({"meta": {}, "tensors": [tensor(part(offset=4))]}, bytes(8)), "lies outside"),
    (raw_payload({"meta": {}, "tensors": [tensor(part(nbytes=-1))]}, bytes(8)), "lies outside"),
    (raw_payload({"meta": {}, "tensors": [tensor(part(nbytes=7))]}, bytes(8)), "malformed"),
    (raw_payload({"meta": {}, "tensors": [tensor(part(shape=[3]))]}, bytes(8)), "malformed"),
    (raw_payload({"meta": {}, "tensors": [tensor(part(dtype="nope"))]}, bytes(8)), "malformed"),
    (raw_payload({"meta": {}, "tensors": [{"name": "t", "parts": [part()]}]}, bytes(8)), "malformed"),
    (raw_payload({"meta": {}, "tensors": ["t"]}), "malformed"),
])
def test_a_malformed_payload_with_a_valid_checksum_is_a_data_error(payload_bytes, match):
    good = raw_payload({"meta": {}, "tensors": [tensor(part())]}, bytes(8))
    assert decode_artifact(encode_artifact(good, "zlib", None, 0))[0]["t"].parts["v"].shape == (2,)
    with pytest.raises(DataError, match=match) as info:
        decode_artifact(encode_artifact(payload_bytes, "zlib", None, 0))
    assert CORRUPT in str(info.value)


def test_pgolf_eval_of_a_truncated_artifact_says_so_without_a_traceback(payload, tmp_path):
    from typer.testing import CliRunner

    from pgolf.cli import EXIT_USER_ERROR, app

    path = tmp_path / "artifact.pga"
    path.write_bytes(blob_for(payload, "brotli")[:-40])
    result = CliRunner().invoke(app, ["eval", str(path)])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    assert isinstance(result.exception, SystemExit)  # CliRunner would swallow any other exception's traceback
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert "error: the artifact is corrupt or truncated" in result.stderr and "pgolf run" in result.stderr

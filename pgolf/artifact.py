"""The artifact: quantized tensors in a plain container, compressed.

Layout on disk: ``b"PGA2"``, one codec byte, one byte-shuffle byte, the 32-byte SHA-256
digest of the uncompressed payload, then the compressed payload. The payload is ``b"PGQ1"``, a
4-byte header length, a JSON header (tensor names, kinds, shapes, dtypes, part offsets, and the
metadata needed to rebuild the model: resolved recipe, enabled techniques, BOS id) and the raw
little-endian tensor bytes. Loading never unpickles anything, and every way a file can be
damaged (truncated, a flipped bit that the codec still decodes, garbage) is a `DataError`: the
digest is checked after decompressing and unshuffling, so it covers the whole decode path. The
pergroup codec's body is its own self-describing frame (`pgolf.codecs`) that decodes to the same payload.
The challenge counts ``code bytes + compressed model bytes`` against a decimal 16,000,000;
both numbers come from real bytes (the code is the submission's train_gpt.py, `pgolf.bundle`),
and the digest's 32 bytes are part of the model bytes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct
import zlib
from typing import Any

import brotli
import numpy as np
import torch

from pgolf.codecs import CODEC_IDS, CODECS, Matrix, compress, decompress
from pgolf.errors import DataError
from pgolf.quant import QuantizedTensor, dtype_name, torch_dtype

FILE_MAGIC = b"PGA2"
LEGACY_MAGICS = (b"PGA1",)  # earlier layouts (PGA1: no checksum), named in the error rather than read
PAYLOAD_MAGIC = b"PGQ1"
DIGEST_SIZE = hashlib.sha256().digest_size  # 32
BODY_OFFSET = len(FILE_MAGIC) + 2 + DIGEST_SIZE  # magic, codec byte, shuffle byte, digest
# What each codec (and the unshuffle) raises on bytes it cannot decode.
CODEC_ERRORS = (zlib.error, lzma.LZMAError, brotli.error, ValueError, EOFError, OverflowError)

CORRUPT_HINT = "Copy the file again from where pgolf run wrote it, or re-create it with pgolf run."

def _tensor_bytes(t: torch.Tensor) -> tuple[bytes, str]:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes(), "bfloat16"
    arr = t.numpy()
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes(), dtype_name(t.dtype)


def _tensor_from(buf: memoryview, dtype: str, shape: list[int]) -> torch.Tensor:
    if dtype == "bfloat16":
        arr = np.frombuffer(buf, dtype="<i2").copy()
        return torch.from_numpy(arr).view(torch.bfloat16).reshape(shape)
    np_dtype = torch.empty(0, dtype=torch_dtype(dtype)).numpy().dtype.newbyteorder("<")
    arr = np.frombuffer(buf, dtype=np_dtype).astype(np_dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(arr).reshape(shape)


def pack(tensors: dict[str, QuantizedTensor], meta: dict[str, Any]) -> bytes:
    """Serialize quantized tensors and metadata into the uncompressed payload."""
    header: dict[str, Any] = {"meta": meta, "tensors": []}
    chunks: list[bytes] = []
    offset = 0
    for name, qt in tensors.items():
        parts = []
        for key, t in qt.parts.items():
            data, dt = _tensor_bytes(t)
            parts.append({"key": key, "dtype": dt, "shape": list(t.shape), "offset": offset, "nbytes": len(data)})
            chunks.append(data)
            offset += len(data)
        header["tensors"].append({"name": name, "kind": qt.kind, "shape": list(qt.shape), "dtype": qt.dtype,
                                  "meta": qt.meta, "parts": parts})
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return PAYLOAD_MAGIC + struct.pack("<I", len(head)) + head + b"".join(chunks)


def _corrupt(what: str) -> DataError:
    return DataError(f"the artifact is corrupt or truncated: {what}", hint=CORRUPT_HINT)


def _read_header(payload: bytes) -> tuple[dict[str, Any], int]:
    """The payload's JSON header and where its tensor bytes start."""
    if payload[:4] != PAYLOAD_MAGIC:
        raise _corrupt(f"its payload starts with {bytes(payload[:4])!r}, not {PAYLOAD_MAGIC!r} (bad magic)")
    if len(payload) < 8:
        raise _corrupt(f"its payload is {len(payload)} bytes, shorter than its 8-byte preamble")
    (head_len,) = struct.unpack("<I", payload[4:8])
    if 8 + head_len > len(payload):
        raise _corrupt(f"its header claims {head_len:,} bytes but only {len(payload) - 8:,} follow")
    try:
        header = json.loads(payload[8 : 8 + head_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(f"its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors"), list) or "meta" not in header:
        raise _corrupt("its header lacks the 'tensors' list or the 'meta' entry")
    return header, 8 + head_len


def int8_matrices(payload: bytes) -> list[Matrix]:
    """Every 2-D int8 part of a payload and where its bytes sit: what the pergroup codec may group."""
    header, start = _read_header(payload)
    return [Matrix(t["name"], p["key"], start + p["offset"], *p["shape"])
            for t in header["tensors"] for p in t["parts"] if p["dtype"] == "int8" and len(p["shape"]) == 2]


def unpack(payload: bytes) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    header, data_start = _read_header(payload)
    body = memoryview(payload)[data_start:]
    tensors = {}
    for entry in header["tensors"]:
        try:
            parts = {}
            for p in entry["parts"]:
                start, size = p["offset"], p["nbytes"]
                if not (isinstance(start, int) and isinstance(size, int) and 0 <= start and 0 <= size
                        and start + size <= len(body)):
                    raise _corrupt(f"part '{p['key']}' of tensor '{entry['name']}' lies outside the "
                                   f"{len(body):,} data bytes (offset {start}, {size} bytes)")
                parts[p["key"]] = _tensor_from(body[start : start + size], p["dtype"], p["shape"])
            tensors[entry["name"]] = QuantizedTensor(entry["kind"], tuple(entry["shape"]), entry["dtype"], parts,
                                                     entry.get("meta", {}))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # missing keys, bad dtype/shape
            name = entry.get("name", "?") if isinstance(entry, dict) else "?"
            raise _corrupt(f"its header entry for tensor '{name}' is malformed ({type(exc).__name__}: {exc})") from None
    return tensors, header["meta"]


def encode_artifact(payload: bytes, codec: str, level: int | None, shuffle: int, coder: str = "auto",
                    layout: str = "roles") -> bytes:
    """`coder` and `layout` are pergroup's (`export.group_coder`, `export.group_layout`)."""
    digest = hashlib.sha256(payload).digest()
    matrices = int8_matrices(payload) if codec == "pergroup" else ()
    body = compress(payload, codec, level, shuffle, matrices, coder, layout)
    return FILE_MAGIC + bytes([CODEC_IDS[codec], shuffle]) + digest + body


def encode_export(payload: bytes, export: Any) -> bytes:
    """The artifact an `ExportConfig` asks for."""
    return encode_artifact(payload, export.codec, export.level, export.byte_shuffle, export.group_coder,
                           export.group_layout)


def decode_artifact(blob: bytes) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    """Decode and verify an artifact; anything but an intact artifact raises `DataError`."""
    magic = bytes(blob[: len(FILE_MAGIC)])
    if magic in LEGACY_MAGICS:
        raise DataError(f"the artifact uses the older {magic.decode()} layout, which carries no checksum",
                        hint="Re-create it with this pgolf's pgolf run (pgolf eval also scores its final_model.pt).")
    if magic != FILE_MAGIC:
        raise DataError(f"not a pgolf artifact, or one corrupt from its first bytes (bad magic {magic!r}, "
                        f"expected {FILE_MAGIC!r})", hint="Pass an artifact.pga written by pgolf run.")
    if len(blob) <= BODY_OFFSET:
        raise _corrupt(f"it is {len(blob)} bytes, too short for its {BODY_OFFSET}-byte preamble and a body")
    codec_id, shuffle = blob[4], blob[5]
    if codec_id >= len(CODECS):
        raise _corrupt(f"its codec byte is {codec_id}, not one of the {len(CODECS)} known codecs ({', '.join(CODECS)})")
    codec = CODECS[codec_id]
    digest = bytes(blob[6:BODY_OFFSET])
    try:
        payload = decompress(bytes(blob[BODY_OFFSET:]), codec, shuffle)
    except CODEC_ERRORS as exc:
        raise _corrupt(f"its {codec} body does not decompress ({type(exc).__name__}: {exc})") from None
    if hashlib.sha256(payload).digest() != digest:
        raise _corrupt("the SHA-256 of its decompressed payload does not match the stored checksum")
    return unpack(payload)

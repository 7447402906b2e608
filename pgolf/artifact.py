"""The artifact: quantized tensors in a plain container, compressed, plus the counted code bytes.

Layout on disk: ``b"PGA1"``, one codec byte, one byte-shuffle byte, then the compressed
payload. The payload is ``b"PGQ1"``, a 4-byte header length, a JSON header (tensor names,
kinds, shapes, dtypes, part offsets, and the metadata needed to rebuild the model: resolved
recipe, enabled techniques, BOS id) and the raw little-endian tensor bytes. Loading never
unpickles anything. The challenge counts ``code bytes + compressed model bytes`` against a
decimal 16,000,000; both numbers come from real bytes.
"""

from __future__ import annotations

import base64
import importlib
import json
import lzma
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.codecs import CODEC_IDS, CODECS, compress, decompress
from pgolf.errors import DataError
from pgolf.quant import QuantizedTensor, dtype_name, torch_dtype

FILE_MAGIC = b"PGA1"
PAYLOAD_MAGIC = b"PGQ1"

# The host modules a submission needs to train and evaluate (CLI, ablation and statistics are
# tooling, not submission code). Enabled techniques add their own modules.
SUBMISSION_MODULES = (
    "pgolf.model", "pgolf.optim", "pgolf.train", "pgolf.data", "pgolf.shards", "pgolf.bpb", "pgolf.tokenizer",
    "pgolf.quant", "pgolf.codecs", "pgolf.artifact", "pgolf.evaluate", "pgolf.lifecycle", "pgolf.defaults",
    "pgolf.context", "pgolf.recipe", "pgolf.config", "pgolf.hookspecs", "pgolf.registry", "pgolf.errors",
)


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


def unpack(payload: bytes) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    if payload[:4] != PAYLOAD_MAGIC:
        raise DataError("not a pgolf artifact payload (bad magic)")
    (head_len,) = struct.unpack("<I", payload[4:8])
    header = json.loads(payload[8 : 8 + head_len].decode("utf-8"))
    body = memoryview(payload)[8 + head_len :]
    tensors = {}
    for entry in header["tensors"]:
        parts = {
            p["key"]: _tensor_from(body[p["offset"] : p["offset"] + p["nbytes"]], p["dtype"], p["shape"])
            for p in entry["parts"]
        }
        tensors[entry["name"]] = QuantizedTensor(entry["kind"], tuple(entry["shape"]), entry["dtype"], parts,
                                                 entry.get("meta", {}))
    return tensors, header["meta"]


def encode_artifact(payload: bytes, codec: str, level: int | None, shuffle: int) -> bytes:
    return FILE_MAGIC + bytes([CODEC_IDS[codec], shuffle]) + compress(payload, codec, level, shuffle)


def decode_artifact(blob: bytes) -> tuple[dict[str, QuantizedTensor], dict[str, Any]]:
    if blob[:4] != FILE_MAGIC:
        raise DataError("not a pgolf artifact (bad magic)", hint="Pass an artifact.pga written by pgolf run.")
    codec_id, shuffle = blob[4], blob[5]
    if codec_id >= len(CODECS):
        raise DataError(f"artifact uses unknown codec id {codec_id}")
    return unpack(decompress(blob[6:], CODECS[codec_id], shuffle))


@dataclass
class CodeBytes:
    raw: int  # UTF-8 bytes of the submission's source files
    compressed: int  # a self-extracting LZMA + base85 wrapper of them, as records count code
    files: list[str]


def module_files(modules: list[str]) -> list[Path]:
    files = []
    for name in modules:
        module = importlib.import_module(name)
        if module.__file__:
            files.append(Path(module.__file__))
    return files


def code_bytes(technique_modules: list[str]) -> CodeBytes:
    """Bytes of the code a submission would ship: host lifecycle modules + enabled techniques."""
    names = list(dict.fromkeys([*SUBMISSION_MODULES, *technique_modules]))
    files = module_files(names)
    sources = [f.read_bytes() for f in files]
    joined = b"\n".join(sources)
    wrapper = (b'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
               + base64.b85encode(lzma.compress(joined, preset=9)) + b'")))\n')
    return CodeBytes(raw=sum(len(s) for s in sources), compressed=len(wrapper), files=[f.name for f in files])

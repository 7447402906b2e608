"""The challenge's token shard format, read and written exactly.

A shard is 256 little-endian int32 (magic 20240520, version 1, token count, then zeros)
followed by the tokens as little-endian uint16. Every document starts with BOS (id 1 for the
challenge tokenizers). The byte sidecar (`fineweb_val_bytes_*.bin`) uses the same layout with
one count of original UTF-8 bytes per validation token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from pgolf.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # tokens per shard in the challenge's exporter

TRAIN_GLOB = "fineweb_train_*.bin"
VAL_GLOB = "fineweb_val_*.bin"
VAL_BYTES_GLOB = "fineweb_val_bytes_*.bin"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray | Iterable[int]) -> None:
    """Write one shard atomically (a crash never leaves a half-written file under the name)."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
        raise DataError(f"cannot write {path}: values must fit in uint16 (0..65535)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, arr.size
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(arr.astype("<u2", copy=False).tobytes())
    os.replace(tmp, path)


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"shard not found: {path}") from None
    if size < HEADER_BYTES:
        raise DataError(f"corrupt shard {path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != MAGIC:
        raise DataError(f"corrupt shard {path}: bad magic {int(header[0])} (expected {MAGIC})",
                        hint="Is this a challenge-format .bin shard?")
    if int(header[1]) != VERSION:
        raise DataError(f"corrupt shard {path}: unsupported version {int(header[1])} (expected {VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        raise DataError(f"corrupt shard {path}: size mismatch ({size} bytes on disk, header says {count} tokens = {expected} bytes)",
                        hint="The file was truncated or written incompletely; fetch or rebuild it.")
    return count


def read_shard(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Read a shard's tokens (uint16, memory-mapped); reject ids >= vocab_size."""
    count = read_header(path)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None and count:
        top = int(tokens.max())
        if top >= vocab_size:
            raise DataError(f"corrupt shard {path}: token id {top} is out of range for vocab size {vocab_size}",
                            hint="The shards and the tokenizer/recipe vocab do not match.")
    return tokens


def _index(path: Path) -> int:
    match = re.search(r"_(\d+)\.bin$", path.name)
    return int(match.group(1)) if match else -1


def list_shards(directory: str | Path, pattern: str) -> list[Path]:
    """Shards matching `pattern`, in index order; byte sidecars never count as token shards."""
    paths = [p for p in Path(directory).glob(pattern) if "_bytes_" not in p.name or "bytes" in pattern]
    return sorted(paths, key=lambda p: (_index(p), p.name))


def write_split(directory: str | Path, split: str, tokens: np.ndarray, shard_tokens: int = SHARD_TOKENS) -> list[Path]:
    """Write a token stream as consecutive shards of at most `shard_tokens` tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = directory / shard_name(split, i)
        write_shard(path, tokens[start : start + shard_tokens])
        paths.append(path)
    return paths


def document_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """Indices where documents begin (each document starts with BOS)."""
    return np.flatnonzero(np.asarray(tokens) == bos_id)

"""Compression codecs for artifacts; sizes are always the real codec's output.

zlib level 9 is the baseline; records moved to LZMA preset 9 and then to brotli quality 11
after a stride-2 byte shuffle (grouping the high and low bytes of 16-bit values).
"""

from __future__ import annotations

import lzma
import zlib

import brotli
import numpy as np

CODECS = ("zlib", "lzma", "brotli")
CODEC_IDS = {name: i for i, name in enumerate(CODECS)}
DEFAULT_LEVELS = {"zlib": 9, "lzma": 9, "brotli": 11}


def byte_shuffle(data: bytes, stride: int) -> bytes:
    """Group byte j of every `stride`-byte element together (the tail stays in place)."""
    if stride <= 1:
        return data
    arr = np.frombuffer(data, dtype=np.uint8)
    body = len(arr) - len(arr) % stride
    return arr[:body].reshape(-1, stride).T.tobytes() + arr[body:].tobytes()


def byte_unshuffle(data: bytes, stride: int) -> bytes:
    if stride <= 1:
        return data
    arr = np.frombuffer(data, dtype=np.uint8)
    body = len(arr) - len(arr) % stride
    return arr[:body].reshape(stride, -1).T.tobytes() + arr[body:].tobytes()


def compress(data: bytes, codec: str, level: int | None = None, shuffle: int = 0) -> bytes:
    level = DEFAULT_LEVELS[codec] if level is None else level
    data = byte_shuffle(data, shuffle)
    if codec == "zlib":
        return zlib.compress(data, level=level)
    if codec == "lzma":
        return lzma.compress(data, preset=level)
    if codec == "brotli":
        return brotli.compress(data, quality=level)
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def decompress(blob: bytes, codec: str, shuffle: int = 0) -> bytes:
    if codec == "zlib":
        data = zlib.decompress(blob)
    elif codec == "lzma":
        data = lzma.decompress(blob)
    elif codec == "brotli":
        data = brotli.decompress(blob)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return byte_unshuffle(data, shuffle)

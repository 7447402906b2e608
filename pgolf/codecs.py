"""Compression codecs for artifacts; sizes are always the real codec's output.

zlib level 9 is the baseline; records moved to LZMA preset 9 and then to brotli quality 11
after a stride-2 byte shuffle (grouping the high and low bytes of 16-bit values).

``pergroup`` is #1855's layout (kept through #2060; #2130/#2135 use the ``single`` variant): the
int8 code matrices of the big weights are cut out of the payload into role groups (every layer's
``attn.c_q`` together, ...), the rows of the hot groups put in greedy L1 nearest-neighbour order
(the permutation is stored so decoding undoes it), each matrix transposed, and every group coded by
a ZPAQ-class coder; the rest of the payload goes through brotli. The frame is self-describing: it
names the coder of every stream and where each matrix sat in the payload, so decoding needs no
grouping rules and rebuilds the exact payload bytes (the artifact's SHA-256 then checks them).
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import brotli
import numpy as np

from pgolf.errors import ConfigError, DataError

CODECS = ("zlib", "lzma", "brotli", "pergroup")
CODEC_IDS = {name: i for i, name in enumerate(CODECS)}
DEFAULT_LEVELS = {"zlib": 9, "lzma": 9, "brotli": 11, "pergroup": 11}  # pergroup: brotli quality of the rest


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


def compress(data: bytes, codec: str, level: int | None = None, shuffle: int = 0,
             matrices: Sequence[Matrix] = (), coder: str = "auto", layout: str = "roles") -> bytes:
    """`matrices`, `coder` and `layout` only matter to pergroup (the int8 matrices it may group)."""
    level = DEFAULT_LEVELS[codec] if level is None else level
    if codec == "pergroup":
        return encode_pergroup(data, matrices, level, shuffle, coder, layout)
    data = byte_shuffle(data, shuffle)
    if codec == "zlib":
        return zlib.compress(data, level=level)
    if codec == "lzma":
        return lzma.compress(data, preset=level)
    if codec == "brotli":
        return brotli.compress(data, quality=level)
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def decompress(blob: bytes, codec: str, shuffle: int = 0) -> bytes:
    if codec == "pergroup":
        return decode_pergroup(blob, shuffle)
    if codec == "zlib":
        data = zlib.decompress(blob)
    elif codec == "lzma":
        data = lzma.decompress(blob)
    elif codec == "brotli":
        data = brotli.decompress(blob)
    else:
        raise ValueError(f"unknown codec {codec!r}")
    return byte_unshuffle(data, shuffle)


# --- pergroup ------------------------------------------------------------------------------------


class Matrix(NamedTuple):
    """A 2-D int8 part inside the payload: its tensor and part names, where its bytes start, its shape."""

    name: str
    part: str
    start: int
    rows: int
    cols: int


# #1855 `_GROUP_ORDER` (stream order) and `_SIMSORT_KEYS` (the hot groups whose rows are reordered).
GROUP_ROLES = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
               "mlp.fc.weight", "mlp.proj.weight")
SORTED_ROLES = frozenset({"tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight"})
LAYOUTS = ("roles", "single")
GROUP_CODERS = ("lrzip", "zpaq", "brotli")  # the order `auto` tries them in
CODER_INSTALL = {"lrzip": "install the lrzip program (Debian/Ubuntu: apt-get install lrzip)",
                 "zpaq": "pip install 'pgolf[zpaq]'"}
# #1855 runs `lrzip -z -L 9` (ZPAQ, strongest). -T skips lrzip's LZ4 pre-test, which stores a chunk raw
# when LZ4 finds nothing in it although ZPAQ would (int6 codes in int8 bytes); it never changes a chunk
# the pre-test lets through.
LRZIP_COMPRESS = ("-z", "-L", "9", "-T")
ZPAQ_LEVEL = 5  # the binding's strongest; one thread, so the bytes do not depend on the machine
FRAME_MAGIC = b"PGG1"
MAX_SORTED_ROWS = 65_536  # permutations are stored as uint16, as the records store them


def role_of(name: str) -> str | None:
    """The records' group of a tensor: `tok_emb.weight` or the `<role>` of `blocks.<i>.<role>`."""
    if name == "tok_emb.weight":
        return name
    m = re.fullmatch(r"blocks\.\d+\.(.+)", name)
    return m[1] if m and m[1] in GROUP_ROLES else None


def group_matrices(matrices: Sequence[Matrix], layout: str) -> list[tuple[str, list[tuple[Matrix, bool]]]]:
    """The coded groups in stream order, each member with whether its rows are reordered.

    roles (#1855-#2060): one group per role in GROUP_ROLES order, layers ascending, SORTED_ROLES
    reordered. single (#2130/#2135): one group of every role's matrix by name, all reordered."""
    codes = [m for m in matrices if m.part == "q" and role_of(m.name)]
    if layout == "single":
        members = sorted(codes, key=lambda m: f"{m.name}.{m.part}")
        return [("q", [(m, m.rows <= MAX_SORTED_ROWS) for m in members])] if members else []
    if layout != "roles":
        raise ValueError(f"unknown pergroup layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    groups = []
    for role in GROUP_ROLES:
        members = sorted((m for m in codes if role_of(m.name) == role), key=lambda m: int(m.name.split(".")[1])
                         if m.name.startswith("blocks.") else 0)
        if members:
            groups.append((role, [(m, role in SORTED_ROLES and m.rows <= MAX_SORTED_ROWS) for m in members]))
    return groups


def nearest_neighbour_order(codes: np.ndarray) -> np.ndarray:
    """Greedy L1 chain over the rows from row 0: each next row is the closest one left, the lowest
    index on a tie (#1855 `_similarity_sort_l1`), so neighbouring rows differ little once transposed."""
    pool = codes.astype(np.int16)
    left = np.arange(len(codes))
    order = np.empty(len(codes), dtype=np.int64)
    current, count = 0, len(codes)
    for k in range(len(codes)):
        order[k] = left[current]
        row = pool[current].copy()
        pool[current : count - 1] = pool[current + 1 : count]  # keep the pool in index order (ties)
        left[current : count - 1] = left[current + 1 : count]
        count -= 1
        if count:
            current = int(np.abs(pool[:count] - row).sum(axis=1, dtype=np.int32).argmin())
    return order


def coder_available(coder: str) -> bool:
    if coder == "lrzip":
        return shutil.which("lrzip") is not None
    if coder == "zpaq":  # imported by name: an optional coder, not a requirement of every bundle
        return importlib.util.find_spec("zpaq") is not None
    return coder == "brotli"


def resolve_coder(coder: str) -> str:
    """`auto`: the strongest installed coder (lrzip, then the zpaq binding, then brotli)."""
    if coder == "auto":
        return next(c for c in GROUP_CODERS if coder_available(c))
    if coder not in GROUP_CODERS:
        raise ConfigError(f"unknown pergroup coder {coder!r}", key="export.group_coder",
                          hint=f"Use one of auto, {', '.join(GROUP_CODERS)}.")
    if not coder_available(coder):
        raise ConfigError(f"the pergroup coder {coder} is not installed", key="export.group_coder",
                          hint=f"To use it, {CODER_INSTALL[coder]}; or choose group_coder: auto.")
    return coder


def _lrzip(data: bytes, args: Sequence[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pgolf-lrzip-") as tmp:
        source, target = Path(tmp, "in"), Path(tmp, "out")
        source.write_bytes(data)
        # -N 0: lrzip renices itself to 19 by default, which starves it on a busy machine
        done = subprocess.run(["lrzip", "-q", "-f", "-N", "0", *args, "-o", str(target), str(source)],
                              capture_output=True)
        if done.returncode != 0 or not target.exists():
            raise ValueError(f"lrzip {' '.join(args)} failed (exit {done.returncode}): "
                             f"{done.stderr.decode(errors='replace').strip()[-200:]}")
        return target.read_bytes()


def group_compress(data: bytes, coder: str, level: int) -> bytes:
    if coder == "brotli":
        return brotli.compress(data, quality=level)
    if coder == "zpaq":
        return importlib.import_module("zpaq").compress(data, level=ZPAQ_LEVEL, threads=1)
    return _lrzip(data, LRZIP_COMPRESS)


def group_decompress(blob: bytes, coder: str) -> bytes:
    if coder not in GROUP_CODERS:
        raise ValueError(f"unknown group coder {coder!r}")
    if not coder_available(coder):
        raise DataError(f"the artifact's weights were coded with {coder}, which is not installed here",
                        hint=f"To load it, {CODER_INSTALL[coder]}.")
    if coder == "brotli":
        return brotli.decompress(blob)
    if coder == "zpaq":
        zpaq = importlib.import_module("zpaq")
        try:
            return zpaq.decompress(blob)
        except zpaq.Error as exc:
            raise ValueError(f"zpaq: {exc}") from None
    return _lrzip(blob, ("-d",))


def arrange_groups(payload: bytes, groups: list[tuple[str, list[tuple[Matrix, bool]]]]) -> tuple[list[bytes], bytes]:
    """Each group's bytes as its coder sees them (rows reordered where asked, every matrix transposed)
    and the row permutations, uint16 little-endian, in stream order."""
    raw_groups, perms = [], []
    for _, members in groups:
        raw = []
        for m, reorder in members:
            codes = np.frombuffer(payload, np.int8, m.rows * m.cols, m.start).reshape(m.rows, m.cols)
            if reorder:
                order = nearest_neighbour_order(codes)
                perms.append(order.astype("<u2").tobytes())
                codes = codes[order]
            raw.append(np.ascontiguousarray(codes.T).tobytes())
        raw_groups.append(b"".join(raw))
    return raw_groups, b"".join(perms)


def encode_pergroup(payload: bytes, matrices: Sequence[Matrix], level: int, shuffle: int, coder: str = "auto",
                    layout: str = "roles") -> bytes:
    """Frame: magic, u32 index size, brotli JSON index, then the rest, permutation and group streams."""
    coder = resolve_coder(coder)
    groups = group_matrices(matrices, layout)
    rest, cursor = [], 0
    for m in sorted((m for _, members in groups for m, _ in members), key=lambda m: m.start):
        rest.append(payload[cursor : m.start])
        cursor = m.start + m.rows * m.cols
    rest.append(payload[cursor:])
    raw_groups, perm_bytes = arrange_groups(payload, groups)
    streams, index_groups = [], []
    for (role, members), raw in zip(groups, raw_groups, strict=True):
        streams.append(group_compress(raw, coder, level))
        index_groups.append({"role": role, "coder": coder, "nbytes": len(streams[-1]),
                             "members": [[m.start, m.rows, m.cols, int(reorder)] for m, reorder in members]})
    perm_coder = "raw" if layout == "single" else "brotli"  # #2135 stores them raw in its frame, #1855 brotli-11
    perm_blob = brotli.compress(perm_bytes, quality=11) if perm_coder == "brotli" and perm_bytes else perm_bytes
    rest_blob = brotli.compress(byte_shuffle(b"".join(rest), shuffle), quality=level)
    index = {"layout": layout, "rest": len(rest_blob), "perms": [perm_coder, len(perm_blob)], "groups": index_groups}
    head = brotli.compress(json.dumps(index, separators=(",", ":"), sort_keys=True).encode())
    return FRAME_MAGIC + struct.pack("<I", len(head)) + head + rest_blob + perm_blob + b"".join(streams)


def decode_pergroup(blob: bytes, shuffle: int) -> bytes:
    """The exact payload `encode_pergroup` framed; a malformed frame is a ValueError."""
    try:
        return _decode_frame(blob, shuffle)
    except (KeyError, TypeError, IndexError, struct.error) as exc:
        raise ValueError(f"malformed pergroup frame ({type(exc).__name__}: {exc})") from None


def _decode_frame(blob: bytes, shuffle: int) -> bytes:
    if blob[:4] != FRAME_MAGIC:
        raise ValueError(f"a pergroup body starts with {FRAME_MAGIC!r}, not {bytes(blob[:4])!r}")
    (head_size,) = struct.unpack_from("<I", blob, 4)
    index = json.loads(brotli.decompress(blob[8 : 8 + head_size]))
    pos = 8 + head_size

    def take(size: int) -> bytes:
        nonlocal pos
        if not isinstance(size, int) or size < 0 or pos + size > len(blob):
            raise ValueError(f"a pergroup stream of {size} bytes runs past the body's {len(blob)} bytes")
        pos += size
        return blob[pos - size : pos]

    rest = byte_unshuffle(brotli.decompress(take(index["rest"])), shuffle)
    perm_coder, perm_size = index["perms"]
    perms = take(perm_size)
    if perm_coder == "brotli" and perms:
        perms = brotli.decompress(perms)
    pieces, perm_at = [], 0
    for group in index["groups"]:
        raw, at = group_decompress(take(group["nbytes"]), group["coder"]), 0
        for start, rows, cols, reorder in group["members"]:
            codes = np.frombuffer(raw, np.int8, rows * cols, at).reshape(cols, rows).T
            at += rows * cols
            if reorder:
                order = np.frombuffer(perms, "<u2", rows, perm_at).astype(np.int64)
                perm_at += 2 * rows
                restored = np.empty_like(codes)
                restored[order] = codes
                codes = restored
            pieces.append((start, np.ascontiguousarray(codes).tobytes()))
        if at != len(raw):
            raise ValueError(f"group {group['role']} decodes to {len(raw)} bytes, its matrices hold {at}")
    if pos != len(blob) or perm_at != len(perms):
        raise ValueError("the pergroup frame has bytes its index does not account for")
    out, used, end = bytearray(), 0, 0
    for start, data in sorted(pieces):
        gap = start - end
        if gap < 0 or used + gap > len(rest):
            raise ValueError("the pergroup index places matrices outside the payload")
        out += rest[used : used + gap] + data
        used, end = used + gap, start + len(data)
    return bytes(out + rest[used:])

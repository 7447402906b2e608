"""The challenge shard format: exact bytes, round trips, and every corruption the reader rejects."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pgolf.data import shards
from pgolf.errors import DataError


def test_header_is_exactly_the_challenge_layout(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    shards.write_shard(path, [1, 5, 65535, 0])
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 4
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, 4)
    assert set(header[3:]) == {0}
    assert struct.unpack("<4H", raw[1024:]) == (1, 5, 65535, 0)


def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1024, size=10_000)
    path = tmp_path / "s.bin"
    shards.write_shard(path, tokens)
    assert shards.read_header(path) == 10_000
    np.testing.assert_array_equal(shards.read_shard(path, vocab_size=1024), tokens)


def test_empty_shard(tmp_path):
    shards.write_shard(tmp_path / "e.bin", [])
    assert shards.read_shard(tmp_path / "e.bin").size == 0


def _corrupt(path, offset, value):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: _corrupt(p, 0, 12345), "bad magic"),
        (lambda p: _corrupt(p, 4, 2), "unsupported version"),
        (lambda p: _corrupt(p, 8, 99), "size mismatch"),
        (lambda p: p.write_bytes(p.read_bytes()[:-2]), "size mismatch"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than"),
    ],
)
def test_each_corruption_is_a_clear_error(tmp_path, mutate, message):
    path = tmp_path / "fineweb_train_000000.bin"
    shards.write_shard(path, np.arange(50))
    mutate(path)
    with pytest.raises(DataError, match=message) as info:
        shards.read_shard(path)
    assert str(path) in str(info.value)


def test_token_out_of_vocab_is_rejected(tmp_path):
    path = tmp_path / "s.bin"
    shards.write_shard(path, [1, 2, 1024])
    with pytest.raises(DataError, match="token id 1024 is out of range for vocab size 1024"):
        shards.read_shard(path, vocab_size=1024)


def test_missing_shard(tmp_path):
    with pytest.raises(DataError, match="not found"):
        shards.read_shard(tmp_path / "nope.bin")


def test_values_that_do_not_fit_uint16_are_refused(tmp_path):
    with pytest.raises(DataError, match="uint16"):
        shards.write_shard(tmp_path / "s.bin", [70_000])


def test_listing_orders_by_index_and_ignores_byte_sidecars(tmp_path):
    for name in ("fineweb_val_000001.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"):
        shards.write_shard(tmp_path / name, [1])
    assert [p.name for p in shards.list_shards(tmp_path, shards.VAL_GLOB)] == [
        "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    assert [p.name for p in shards.list_shards(tmp_path, shards.VAL_BYTES_GLOB)] == ["fineweb_val_bytes_000000.bin"]


def test_write_split_cuts_streams_into_shards(tmp_path):
    paths = shards.write_split(tmp_path, "train", np.arange(25), shard_tokens=10)
    assert [p.name for p in paths] == [f"fineweb_train_00000{i}.bin" for i in range(3)]
    joined = np.concatenate([shards.read_shard(p) for p in paths])
    np.testing.assert_array_equal(joined, np.arange(25))


def test_document_starts():
    np.testing.assert_array_equal(shards.document_starts(np.array([1, 5, 6, 1, 7]), 1), [0, 3])

"""BPB accounting against the challenge's rule, on the official tokenizers when present."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sentencepiece as spm

from pgolf.data.bpb import build_byte_tables, loss_and_bpb, nats_to_bpb, stream_bytes
from tests.conftest import official_tokenizer

ASCII_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Parameter Golf scores bits per byte on FineWeb validation documents, 2026 edition.",
    "numbers 1234567890 split into digits; punctuation!? (yes), fine.",
]
UNICODE_TEXTS = ["naïve café déjà vu – em dash, ünïcödé and 東京 are multi-byte."]


@pytest.mark.parametrize(
    ("model_name", "texts"),
    [("fineweb_1024_bpe.model", ASCII_TEXTS), ("fineweb_8192_bpe.model", ASCII_TEXTS + UNICODE_TEXTS)],
)
def test_lut_counts_the_original_bytes_of_plain_text(model_name, texts):
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer(model_name)))
    tables = build_byte_tables(sp, sp.vocab_size())
    for text in texts:
        ids = [1, *sp.encode(text)]  # every document starts with BOS
        counted = int(stream_bytes(np.array(ids), tables).sum())
        assert counted == len(text.encode("utf-8")), text


@pytest.mark.parametrize("model_name", ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"])
def test_lut_rule_piece_by_piece(model_name):
    """base bytes of the piece without its leading '▁', +1 for the space unless after a boundary."""
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer(model_name)))
    tables = build_byte_tables(sp, sp.vocab_size())
    for tid in range(sp.vocab_size()):
        piece = sp.id_to_piece(tid)
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):
            assert tables.is_boundary[tid] and tables.base_bytes[tid] == 0
        elif sp.is_byte(tid):
            assert tables.base_bytes[tid] == 1 and not tables.is_boundary[tid]
        else:
            stripped = piece[1:] if piece.startswith("\u2581") else piece
            assert tables.base_bytes[tid] == len(stripped.encode("utf-8"))
            assert tables.has_leading_space[tid] == piece.startswith("\u2581")
    word = next(t for t in range(sp.vocab_size()) if sp.id_to_piece(t).startswith("\u2581") and len(sp.id_to_piece(t)) > 2)
    other = next(t for t in range(sp.vocab_size()) if not tables.is_boundary[t] and not tables.has_leading_space[t])
    after_bos = stream_bytes(np.array([1, word]), tables)[1]
    after_word = stream_bytes(np.array([other, word]), tables)[1]
    assert after_word == after_bos + 1 == tables.base_bytes[word] + 1


def test_bos_targets_are_worth_zero_bytes_but_counted_as_tokens():
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_1024_bpe.model")))
    tables = build_byte_tables(sp, sp.vocab_size())
    ids = np.array([1, *sp.encode("hello"), 1, *sp.encode("world")])
    b = stream_bytes(ids, tables)
    assert b[0] == 0
    assert b[ids == 1].sum() == 0
    assert b.sum() == len("helloworld")


def test_byte_fallback_pieces_count_one_byte_each():
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_8192_bpe.model")))
    tables = build_byte_tables(sp, sp.vocab_size())
    ids = sp.encode("\U0001F600")  # an emoji: four byte-fallback pieces
    assert all(sp.is_byte(i) for i in ids) and len(ids) == 4
    assert stream_bytes(np.array([1, *ids]), tables).sum() == 4


def test_sp1024_unknown_pieces_are_boundaries_worth_zero_bytes():
    """The official 1024 model has no byte fallback: non-ASCII text becomes <unk>, which the
    challenge's rule counts as 0 bytes (and as a boundary for the next piece's space)."""
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_1024_bpe.model")))
    tables = build_byte_tables(sp, sp.vocab_size())
    ids = np.array([1, *sp.encode("caf\u00e9 x")])
    assert sp.unk_id() in ids
    assert tables.base_bytes[sp.unk_id()] == 0 and tables.is_boundary[sp.unk_id()]
    assert stream_bytes(ids, tables).sum() == len("caf x") - 1  # no byte for é, no space after <unk>


def test_table_is_padded_to_the_recipe_vocab():
    sp = spm.SentencePieceProcessor(model_file=str(official_tokenizer("fineweb_1024_bpe.model")))
    tables = build_byte_tables(sp, 1100)
    assert tables.base_bytes.shape == (1100,) and tables.is_boundary[1024:].all()


def test_loss_and_bpb_formula():
    loss, bpb = loss_and_bpb(nll_sum=300.0, num_tokens=100, num_bytes=250)
    assert loss == pytest.approx(3.0)
    assert bpb == pytest.approx(3.0 / math.log(2) * 100 / 250)
    with pytest.raises(ValueError):
        loss_and_bpb(1.0, 0, 0)


def test_nats_margin_in_bpb_matches_the_challenge_table():
    # challenge.md §1.3: SP1024 baseline tokens/byte 0.40945 -> 0.005 nats is 0.00295 bpb
    assert nats_to_bpb(0.005, 0.40945) == pytest.approx(0.00295, abs=5e-6)
    assert nats_to_bpb(0.005, 0.26834) == pytest.approx(0.00194, abs=5e-6)

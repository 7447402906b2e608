"""Bits per byte, counted exactly as the challenge counts it.

For a plain SentencePiece tokenizer each target token is worth
``base_bytes[y] + (has_leading_space[y] and not is_boundary[x])`` bytes, where ``x`` is the
token before it (train_gpt.py `build_sentencepiece_luts` and `eval_val`): control, unknown
and unused pieces are boundaries worth 0 bytes, byte-fallback pieces are worth 1, and the
leading "▁" of a word piece is worth one space unless it follows a boundary (BOS). A text
transform (casefold) instead carries a sidecar of original bytes per token. Either way the
result is one byte count per position of the validation stream, used by every eval path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEADING_SPACE = "\u2581"


@dataclass(frozen=True)
class ByteTables:
    """Per-token-id byte facts of a tokenizer (the challenge's three lookup tables)."""

    base_bytes: np.ndarray  # int16 [table]
    has_leading_space: np.ndarray  # bool [table]
    is_boundary: np.ndarray  # bool [table]


def build_byte_tables(sp: object, vocab_size: int) -> ByteTables:
    """The challenge's `build_sentencepiece_luts`, in numpy."""
    sp_vocab = int(sp.vocab_size())  # type: ignore[attr-defined]
    table = max(sp_vocab, vocab_size)
    base = np.zeros(table, dtype=np.int16)
    lead = np.zeros(table, dtype=np.bool_)
    boundary = np.ones(table, dtype=np.bool_)
    for tid in range(sp_vocab):
        if sp.is_control(tid) or sp.is_unknown(tid) or sp.is_unused(tid):  # type: ignore[attr-defined]
            continue
        boundary[tid] = False
        if sp.is_byte(tid):  # type: ignore[attr-defined]
            base[tid] = 1
            continue
        piece = sp.id_to_piece(tid)  # type: ignore[attr-defined]
        if piece.startswith(LEADING_SPACE):
            lead[tid] = True
            piece = piece[1:]
        base[tid] = len(piece.encode("utf-8"))
    return ByteTables(base, lead, boundary)


def stream_bytes(tokens: np.ndarray, tables: ByteTables) -> np.ndarray:
    """Bytes of each position of a token stream as a target; position 0 has no predecessor (0)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    out = np.zeros(tokens.shape[0], dtype=np.int32)
    if tokens.shape[0] < 2:
        return out
    prev, tgt = tokens[:-1], tokens[1:]
    out[1:] = tables.base_bytes[tgt].astype(np.int32) + (tables.has_leading_space[tgt] & ~tables.is_boundary[prev])
    return out


def loss_and_bpb(nll_sum: float, num_tokens: float, num_bytes: float) -> tuple[float, float]:
    """val_loss (nats/token) and val_bpb = val_loss / ln 2 * tokens / bytes, as eval_val."""
    if num_tokens <= 0 or num_bytes <= 0:
        raise ValueError("no tokens or bytes were scored")
    val_loss = nll_sum / num_tokens
    return val_loss, (val_loss / math.log(2.0)) * (num_tokens / num_bytes)


def nats_to_bpb(delta_nats: float, tokens_per_byte: float) -> float:
    """Convert a per-token margin in nats to bpb with a run's own tokens per byte."""
    return delta_nats * tokens_per_byte / math.log(2.0)

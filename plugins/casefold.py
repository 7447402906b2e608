"""Casefold: the lossless CaseOps text transform, with BPB charged on the original bytes.

CaseOps (challenge PR #1729, kept by every later record) rewrites each maximal run of ASCII
letters in lowercase and marks its case with private-use operators: TITLE (U+E001) before a
capitalised word, ALLCAPS (U+E002) before an all-capitals word of two letters or more,
CAPNEXT (U+E003) before each further capital of a mixed-case word, and ESC (U+E004) before
an operator character that occurs in the text itself. The tokenizer is trained on the
transformed text with the four operators as user-defined symbols (ids 4-7), so "The", "the"
and "THE" share one piece. The transform is a bijection (`decode` inverts `encode`), and the
byte sidecar charges every token the original UTF-8 bytes it covers: operators 0, letters 1,
other characters their UTF-8 length, BOS 0.

The `lowercase` mode (PR #1578 / #1707 style casefolding) drops case instead; it exists for
study only, and its runs fail the byte-accounting audit because they score different text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pgolf.api import VAL_BYTES_GLOB, DataError, RunContext, Technique, list_shards, read_manifest

TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # the order the official tokenizer gives ids 4-7

_ESC_CODE = ord(ESC)
_FIRST_OPERATOR, _LAST_OPERATOR = ord(TITLE), ord(ESC)  # the operators are consecutive code points
_LETTER_RUN_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_NEEDS_ENCODING = re.compile("[A-Z\ue001-\ue004]")
_DECODE_TOKEN = re.compile("[\ue001-\ue004]|[A-Za-z]+|[^A-Za-z\ue001-\ue004]+")
_CAPNEXT_LOWER = str.maketrans({chr(c): CAPNEXT + chr(c).lower() for c in range(ord("A"), ord("Z") + 1)})


class CaseOpsError(DataError):
    """A string that no original text encodes to (an operator in an impossible place)."""


# --- the transform ------------------------------------------------------------------------


def _encode_run(match: re.Match[str]) -> str:
    run = match.group()
    if run[0] in OPERATORS:
        return ESC + run
    if run.islower():
        return run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[0].isupper() and run[1:].islower():
        return TITLE + lower
    head = TITLE + lower[0] if run[0].isupper() else run[0]
    return head + run[1:].translate(_CAPNEXT_LOWER)


def encode(text: str) -> str:
    """The CaseOps form of `text`: ASCII letters lowercased, case carried by operators."""
    if not _NEEDS_ENCODING.search(text):
        return text
    return _LETTER_RUN_OR_OPERATOR.sub(_encode_run, text)


def decode(text: str) -> str:
    """The original text of a CaseOps string (the exact inverse of `encode`).

    Accepts what the records' decoder accepts, including capital letters the tokenizer's NFKC
    produced (they pass through unchanged), and raises `CaseOpsError` on an operator that no
    text encodes to: TITLE or ALLCAPS inside a word, a doubled CAPNEXT, a case operator not
    followed by a letter, or a dangling ESC.
    """
    if not _NEEDS_ENCODING.search(text):
        return text
    out: list[str] = []
    escape = False  # the next character is literal
    mode: str | None = None  # TITLE or ALLCAPS waiting for the next word
    capnext = False  # the next letter is a capital
    in_word = False  # the last character written was an ASCII letter
    allcaps = False  # the current word is all capitals
    for match in _DECODE_TOKEN.finditer(text):
        token = match.group()
        if escape:
            char, token = token[0], token[1:]
            is_letter = char.isascii() and char.isalpha()
            if mode is not None and not is_letter:
                raise CaseOpsError(f"an escaped character cannot take a pending case operator (character {match.start()})")
            out.append(char)
            escape = False
            in_word = is_letter
            allcaps = allcaps and is_letter
            if not token:
                continue
        first = token[0]
        if first == ESC:
            escape = True
        elif first in (TITLE, ALLCAPS):
            if mode is not None or in_word or capnext:
                raise CaseOpsError(f"a word case operator inside a word (character {match.start()})")
            mode = first
        elif first == CAPNEXT:
            if capnext:
                raise CaseOpsError(f"two CAPNEXT operators in a row (character {match.start()})")
            capnext = True
        elif first.isascii() and first.isalpha():
            if in_word:
                if mode is not None:
                    raise CaseOpsError(f"a word case operator leaked into a word (character {match.start()})")
                out.append(first.upper() if allcaps or capnext else first)
            else:
                out.append(first.upper() if mode is not None or capnext else first)
                allcaps = mode == ALLCAPS
                mode = None
                in_word = True
            capnext = False
            out.append(token[1:].upper() if allcaps else token[1:])
        else:
            if mode is not None or capnext:
                raise CaseOpsError(f"a case operator is not followed by an ASCII letter (character {match.start()})")
            out.append(token)
            in_word = allcaps = False
    if escape:
        raise CaseOpsError("the text ends with a dangling ESC operator")
    if mode is not None or capnext:
        raise CaseOpsError("the text ends with a dangling case operator")
    return "".join(out)


# --- per-token original bytes ---------------------------------------------------------------


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _utf8_lengths(cp: np.ndarray) -> np.ndarray:
    return 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)


def original_char_bytes(encoded: str) -> np.ndarray:
    """Original UTF-8 bytes behind each character of a CaseOps string.

    Operators cost 0 (they only carry case), an escaped operator is a literal character of
    the original text (3 bytes), letters 1, anything else its UTF-8 length.
    """
    cp = _code_points(encoded)
    cost = _utf8_lengths(cp)
    is_esc = cp == _ESC_CODE
    # Within a run of ESCs the first escapes the second, the third the fourth, and so on.
    index = np.arange(cp.size)
    run_start = np.maximum.accumulate(np.where(is_esc & ~np.r_[False, is_esc[:-1]], index, 0))
    escaper = is_esc & ((index - run_start) % 2 == 0)
    escaped = np.r_[False, escaper[:-1]]
    operator = (cp >= _FIRST_OPERATOR) & (cp <= _LAST_OPERATOR)
    cost[operator & ~escaped] = 0
    return cost


@dataclass(frozen=True)
class PieceTable:
    """Per vocabulary id: how many normalised characters a piece spells (byte pieces: per position)."""

    chars: np.ndarray  # int64 [vocab]; byte pieces 0 here, they are resolved per position
    is_byte: np.ndarray  # bool [vocab]
    is_continuation: np.ndarray  # bool [vocab]: a byte piece holding a UTF-8 continuation byte
    is_unknown: np.ndarray  # bool [vocab]


@functools.lru_cache(maxsize=8)
def piece_table(sp: object) -> PieceTable:
    size = int(sp.vocab_size())  # type: ignore[attr-defined]
    chars = np.zeros(size, dtype=np.int64)
    is_byte = np.zeros(size, dtype=np.bool_)
    is_cont = np.zeros(size, dtype=np.bool_)
    is_unknown = np.zeros(size, dtype=np.bool_)
    for tid in range(size):
        if sp.is_byte(tid):  # type: ignore[attr-defined]
            is_byte[tid] = True
            is_cont[tid] = int(sp.id_to_piece(tid)[3:5], 16) & 0xC0 == 0x80  # type: ignore[attr-defined]
        elif sp.is_unknown(tid):  # type: ignore[attr-defined]
            is_unknown[tid] = True
        elif not sp.is_control(tid):  # type: ignore[attr-defined]
            chars[tid] = len(sp.id_to_piece(tid))  # type: ignore[attr-defined]
    return PieceTable(chars, is_byte, is_cont, is_unknown)


def piece_spans(sp: object, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids of `text` and the [start, end) character span of `text` each one covers.

    The spans are SentencePiece's piece surfaces (what its proto output reports): a piece
    covers the original characters its normalised characters came from, so a whitespace run
    or a deleted control character belongs to the piece after it, an NFKC-changed character
    to the piece that spells its replacement, and the byte pieces of one character give the
    whole character to the last of them. Whitespace before the first piece and after the
    last belongs to none.
    """
    ids = np.asarray(sp.encode(text), dtype=np.int64)  # type: ignore[attr-defined]
    normalized, offsets = sp.normalize(text, with_offsets=True)  # type: ignore[attr-defined]
    table = piece_table(sp)
    if table.is_unknown[ids].any():
        raise DataError("the tokenizer produced <unk>, so bytes cannot be assigned to tokens",
                        hint="Use a tokenizer trained with byte_fallback (pgolf's and the CaseOps tokenizer are).")
    # A byte piece completes a character unless the next piece continues the same character.
    next_continues = np.r_[table.is_continuation[ids][1:], False]
    chars = np.where(table.is_byte[ids], ~next_continues, table.chars[ids]).astype(np.int64)
    ends = np.cumsum(chars)
    if ends.size and int(ends[-1]) != len(normalized):
        raise DataError(f"the tokenizer's pieces spell {int(ends[-1])} characters but its normaliser "
                        f"produced {len(normalized)}; the sidecar cannot be aligned")
    offsets = np.asarray(offsets, dtype=np.int64)
    starts = offsets[ends - chars]
    return ids, starts, offsets[ends]


def piece_surfaces(sp: object, text: str) -> tuple[list[int], list[str]]:
    """Token ids and the original substring each covers (SentencePiece's `piece.surface`)."""
    ids, starts, ends = piece_spans(sp, text)
    return ids.tolist(), [text[s:e] for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]


def caseops_byte_counts(sp: object, encoded: str) -> tuple[list[int], list[int]]:
    """Token ids of a CaseOps string and the original UTF-8 bytes of each token's surface."""
    ids, starts, ends = piece_spans(sp, encoded)
    csum = np.r_[0, np.cumsum(original_char_bytes(encoded))]
    return ids.tolist(), (csum[ends] - csum[starts]).tolist()


# --- the transforms as the host uses them ----------------------------------------------------


@dataclass(frozen=True)
class CaseOpsTransform:
    """Lossless: operators carry case, the sidecar charges the original bytes."""

    name: str = "casefold"
    lossless: bool = True
    user_symbols: tuple[str, ...] = OPERATORS

    def encode(self, text: str) -> str:
        return encode(text)

    def encode_with_bytes(self, sp: object, text: str) -> tuple[list[int], list[int]]:
        return caseops_byte_counts(sp, encode(text))


@dataclass(frozen=True)
class LowercaseTransform:
    """Lossy (study only): case is dropped, so the text scored is not the original."""

    name: str = "lowercase"
    lossless: bool = False
    user_symbols: tuple[str, ...] = ()

    def encode(self, text: str) -> str:
        return text.lower()

    def encode_with_bytes(self, sp: object, text: str) -> tuple[list[int], list[int]]:
        """The lowered text's bytes per token: what this mode scores, and why it is invalid."""
        lowered = text.lower()
        ids, starts, ends = piece_spans(sp, lowered)
        csum = np.r_[0, np.cumsum(_utf8_lengths(_code_points(lowered)))]
        return ids.tolist(), (csum[ends] - csum[starts]).tolist()


# --- the plugin ---------------------------------------------------------------------------


@dataclass
class CasefoldConfig:
    mode: Literal["caseops", "lowercase"] = "caseops"  # lowercase: lossy, for study; its runs are invalid


class Casefold(Technique):
    name = "casefold"
    summary = "Lossless CaseOps text transform (case operators as tokens) with original-byte BPB accounting"
    Config = CasefoldConfig
    stage = "train"
    follows = ("PR #1729 CaseOps (1.07193 -> 1.06780 with WD taper); PR #1736: ~0.005-0.006 nats/token; "
              "kept by #1769, #1787, #1851, #1855, #1868")

    def transform(self) -> CaseOpsTransform | LowercaseTransform:
        return LowercaseTransform() if self.config.mode == "lowercase" else CaseOpsTransform()

    def pgolf_provide_text_transform(self, ctx: RunContext) -> CaseOpsTransform | LowercaseTransform:
        return self.transform()

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        """Shards given with --data must have been made with this transform."""
        directory = ctx.recipe.data.dir
        if directory is None or not Path(directory).is_dir():
            return []  # the embedded corpus is built with the transform; a missing dir fails in the data stage
        return shard_problems(Path(directory), self.transform().name)


def shard_problems(directory: Path, transform: str) -> list[str]:
    """Why the shards in `directory` cannot serve a run with `transform` (empty when they can)."""
    manifest = read_manifest(directory)
    has_sidecar = bool(list_shards(directory, VAL_BYTES_GLOB))
    fix = ("make them with `pgolf data text FILES --out DIR --casefold`" if transform == "casefold"
           else "the lowercase mode builds its data from the embedded corpus; drop --data")
    if manifest is None:  # the challenge's own export: only its CaseOps variant carries a sidecar
        if transform != "casefold" or not has_sidecar:
            return [f"casefold ({transform}) needs shards made with that transform and a byte sidecar "
                    f"(fineweb_val_bytes_*.bin), and {directory} has no pgolf manifest"
                    f"{'' if has_sidecar else ' and no sidecar'}; {fix}."]
        return []
    made_with = manifest.get("transform")
    if made_with != transform:
        return [f"casefold ({transform}) needs shards made with that transform, but {directory} was made with "
                f"{made_with or 'no transform'}; {fix}."]
    if not has_sidecar:
        return [f"the byte sidecar fineweb_val_bytes_*.bin is missing from {directory}; rebuild the shards: {fix}."]
    return []

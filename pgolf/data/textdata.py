"""Turning documents into a challenge-layout dataset: tokenizer, shards and (optionally) a byte sidecar.

Used by the embedded corpus, by `pgolf data text`, and by text transforms such as casefold.
Documents are split into train and validation by document, never overlapping; the tokenizer
is trained on training documents only. Every document is first put in the tokenizer's
canonical form (SentencePiece's NFKC and whitespace normalisation, which its tokens cannot
undo anyway), so the bytes scored are exactly the stored documents' bytes whichever way they
are counted. A transform rewrites text before tokenizing; since BPB must be charged on the
original bytes, a transformed dataset carries the challenge's sidecar
`fineweb_val_bytes_*.bin` with the original UTF-8 bytes of every validation token.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from pgolf.data import shards
from pgolf.data.tokenizer import BOS_ID, load_tokenizer, text_normalizer, train_tokenizer
from pgolf.errors import DataError

DATASET_MANIFEST = "pgolf_dataset.json"
DATASET_FORMAT = 2  # 2: documents stored in canonical (normalised) form


@runtime_checkable
class TextTransform(Protocol):
    """A text rewrite applied before tokenizing (for example lossless casefolding)."""

    name: str
    lossless: bool  # False: the scored bytes differ from the original text (study only)
    user_symbols: tuple[str, ...]  # pieces the tokenizer must keep whole (operators)

    def encode(self, text: str) -> str: ...

    def encode_with_bytes(self, sp: object, text: str) -> tuple[list[int], list[int]]:
        """Token ids of the transformed text and the original UTF-8 bytes each one covers."""
        ...


@dataclass
class BuiltDataset:
    dir: Path
    tokenizer: Path
    manifest: dict


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (DATASET_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / DATASET_MANIFEST)


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / DATASET_MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_documents(paths: Sequence[Path], doc_mode: str = "file") -> list[str]:
    """Documents from text files (one per file, or one per blank-line paragraph) or JSONL ('text')."""
    if doc_mode not in ("file", "paragraph"):
        raise DataError(f"unknown --doc-mode '{doc_mode}'", hint="Use 'file' or 'paragraph'.")
    docs: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"input file not found: {path}")
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError("expected one JSON object with a 'text' field per line", file=str(path),
                                        line=lineno) from None
                    if isinstance(text, str) and text.strip():
                        docs.append(text)
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if doc_mode == "file":
            docs.append(text)
        else:
            docs.extend(p for p in text.split("\n\n") if p.strip())
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("the inputs contain no non-empty documents")
    return docs


def split_train_val(docs: Sequence[str], val_docs: int | None = None) -> tuple[list[str], list[str]]:
    """The first `val_docs` documents are validation (as the challenge: the first 50,000 docs)."""
    n_val = val_docs if val_docs is not None else max(1, len(docs) // 10)
    if not 0 < n_val < len(docs):
        raise DataError(f"cannot hold out {n_val} of {len(docs)} documents for validation",
                        hint="Pass --val-docs between 1 and the number of documents minus 1.")
    return list(docs[n_val:]), list(docs[:n_val])


def _encode_split(sp: object, docs: Sequence[str], transform: TextTransform | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Concatenate `[BOS] + encode(doc)` for every document; with a transform also the sidecar."""
    pieces: list[np.ndarray] = []
    sidecar: list[np.ndarray] = []
    if transform is None:
        encoded = sp.encode(list(docs), out_type=int)  # type: ignore[attr-defined]
        for ids in encoded:
            pieces.append(np.asarray([BOS_ID, *ids], dtype=np.int64))
        return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), None
    for doc in docs:
        ids, counts = transform.encode_with_bytes(sp, doc)
        if len(ids) != len(counts):
            raise DataError(f"text transform '{transform.name}' returned {len(ids)} ids but {len(counts)} byte counts")
        pieces.append(np.asarray([BOS_ID, *ids], dtype=np.int64))
        sidecar.append(np.asarray([0, *counts], dtype=np.int64))
    return np.concatenate(pieces), np.concatenate(sidecar)


def build_dataset(
    out_dir: str | Path,
    train_docs: Sequence[str],
    val_docs: Sequence[str],
    vocab_size: int,
    transform: TextTransform | None = None,
    tokenizer: str | Path | None = None,
    shard_tokens: int = shards.SHARD_TOKENS,
    source: str = "text",
) -> BuiltDataset:
    """Write tokenizer (trained on train docs unless given), train/val shards and the sidecar.

    Documents are first put in the tokenizer's canonical form (`text_normalizer`); empty ones
    are dropped. The manifest's `val_original_bytes` counts the canonical validation documents.
    """
    if not train_docs or not val_docs:
        raise DataError(f"need at least one training and one validation document (got {len(train_docs)} and {len(val_docs)})",
                        hint="Provide more documents or change the validation split.")
    canonical = text_normalizer(tokenizer)
    train_docs = [c for c in map(canonical, train_docs) if c]
    raw_val_docs, val_docs = val_docs, [c for c in map(canonical, val_docs) if c]
    if not train_docs or not val_docs:
        raise DataError("no training or no validation document is left after normalisation (they hold only "
                        "whitespace or control characters)", hint="Check the inputs' encoding and content.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("fineweb_*.bin")]:
        stale.unlink()
    tok_name = f"pgolf_{vocab_size}_bpe" + (f"_{transform.name}" if transform else "")
    if tokenizer is None:
        texts: Iterable[str] = (transform.encode(d) for d in train_docs) if transform else train_docs
        model_path = train_tokenizer(texts, out / tok_name, vocab_size,
                                     user_symbols=transform.user_symbols if transform else ())
    else:
        model_path = out / Path(tokenizer).name
        if Path(tokenizer).resolve() != model_path.resolve():
            shutil.copyfile(tokenizer, model_path)
    sp = load_tokenizer(model_path)
    if int(sp.vocab_size()) != vocab_size:
        raise DataError(f"the tokenizer has {sp.vocab_size()} pieces, not the requested {vocab_size}",
                        hint="The corpus may be too small for this vocabulary; use a smaller --vocab.")
    train_tokens, _ = _encode_split(sp, train_docs, transform)
    val_tokens, val_bytes = _encode_split(sp, val_docs, transform)
    shards.write_split(out, "train", train_tokens, shard_tokens)
    shards.write_split(out, "val", val_tokens, shard_tokens)
    if val_bytes is not None:
        shards.write_split(out, "val_bytes", val_bytes, shard_tokens)
    manifest = {
        "format": DATASET_FORMAT,
        "source": source,
        "vocab_size": vocab_size,
        "tokenizer": model_path.name,
        "transform": transform.name if transform else None,
        "lossless": transform.lossless if transform else True,
        "docs_train": len(train_docs),
        "docs_val": len(val_docs),
        "tokens_train": int(train_tokens.size),
        "tokens_val": int(val_tokens.size),
        "val_original_bytes": int(sum(len(d.encode("utf-8")) for d in val_docs)),
        "val_bytes_before_normalization": int(sum(len(d.encode("utf-8")) for d in raw_val_docs)),
        "val_docs_sha1": hashlib.sha1("\x00".join(val_docs).encode("utf-8")).hexdigest(),
    }
    write_manifest(out, manifest)
    return BuiltDataset(out, model_path, manifest)

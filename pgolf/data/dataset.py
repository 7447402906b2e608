"""The data stage: locate or build shards, load validation tokens and their byte counts, stream training tokens.

Two sources: a directory of challenge shards (`--data DIR`, like the challenge's DATA_PATH) or
the embedded corpus, tokenized once and cached. Every read of a shard is recorded in a
`DataLedger` with its purpose, so the no-validation-leakage audit can prove that training,
calibration and frequency counts touched only training shards.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pgolf.data import shards
from pgolf.data.bpb import build_byte_tables, stream_bytes
from pgolf.data.corpus import cache_dir, corpus_id, embedded_documents, is_validation_document
from pgolf.data.textdata import DATASET_FORMAT, TextTransform, build_dataset, read_manifest
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import DataError

TRAIN_PURPOSES = ("train", "calibration", "frequency")


@dataclass
class DataLedger:
    """Which shard files were read, for what: {purpose: [file names]}."""

    reads: dict[str, list[str]] = field(default_factory=dict)

    def record(self, purpose: str, path: Path) -> None:
        names = self.reads.setdefault(purpose, [])
        if path.name not in names:
            names.append(path.name)

    def merge(self, other: dict[str, list[str]]) -> None:
        for purpose, names in other.items():
            for name in names:
                if name not in self.reads.setdefault(purpose, []):
                    self.reads[purpose].append(name)

    def validation_reads_outside_eval(self) -> dict[str, list[str]]:
        return {
            purpose: [n for n in names if n.startswith("fineweb_val")]
            for purpose, names in self.reads.items()
            if purpose != "eval" and any(n.startswith("fineweb_val") for n in names)
        }


@dataclass
class Dataset:
    """Everything a run needs to know about its data."""

    dir: Path
    tokenizer_path: Path
    vocab_size: int
    bos_id: int
    train_files: list[Path]
    val_files: list[Path]
    val_tokens: np.ndarray  # the whole validation stream (int64)
    val_bytes: np.ndarray  # bytes of each position as a target (int32; position 0 = 0)
    byte_source: str  # "lut" (leading-space rule) or "sidecar" (original bytes)
    transform: str | None
    lossless: bool
    source: str  # "embedded" or "shards"
    ledger: DataLedger = field(default_factory=DataLedger)

    @property
    def fingerprint(self) -> str:
        """Identifies the data for cache keys: file names and sizes plus the tokenizer bytes."""
        h = hashlib.sha256()
        for path in (*self.train_files, *self.val_files, self.tokenizer_path):
            h.update(path.name.encode())
            h.update(str(path.stat().st_size).encode())
        h.update(hashlib.sha256(self.tokenizer_path.read_bytes()).digest())
        h.update(hashlib.sha256(self.val_tokens.tobytes()).digest())
        return h.hexdigest()[:16]

    def train_stream(self, purpose: str = "train") -> TokenStream:
        if purpose not in TRAIN_PURPOSES:
            raise ValueError(f"unknown training-data purpose {purpose!r}")
        return TokenStream(self.train_files, self.ledger, purpose, self.vocab_size)

    def train_shard_tokens(self, purpose: str) -> Iterator[np.ndarray]:
        """Each training shard's tokens in order, each read recorded in the ledger under `purpose`."""
        if purpose not in TRAIN_PURPOSES:
            raise ValueError(f"unknown training-data purpose {purpose!r}")
        for path in self.train_files:
            tokens = shards.read_shard(path, self.vocab_size)
            self.ledger.record(purpose, path)
            yield tokens

    def describe(self) -> dict:
        return {
            "dir": str(self.dir),
            "source": self.source,
            "tokenizer": str(self.tokenizer_path),
            "vocab_size": self.vocab_size,
            "train_shards": len(self.train_files),
            "val_shards": len(self.val_files),
            "val_tokens": int(self.val_tokens.size),
            "val_bytes_total": int(self.val_bytes.sum()),
            "byte_source": self.byte_source,
            "transform": self.transform,
            "lossless": self.lossless,
            "fingerprint": self.fingerprint,
        }


class TokenStream:
    """Reads training shards in order and wraps around forever (the challenge's TokenStream)."""

    def __init__(self, files: list[Path], ledger: DataLedger, purpose: str, vocab_size: int) -> None:
        if not files:
            raise DataError("no training shards to read")
        self.files, self.ledger, self.purpose, self.vocab_size = files, ledger, purpose, vocab_size
        self.file_idx = 0
        self.tokens = self._load(0)
        self.pos = 0

    def _load(self, idx: int) -> np.ndarray:
        path = self.files[idx]
        self.ledger.record(self.purpose, path)
        return shards.read_shard(path, self.vocab_size)

    def take(self, n: int) -> np.ndarray:
        chunks = []
        remaining = n
        while remaining > 0:
            avail = self.tokens.shape[0] - self.pos
            if avail <= 0:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens = self._load(self.file_idx)
                self.pos = 0
                continue
            k = min(remaining, avail)
            chunks.append(np.asarray(self.tokens[self.pos : self.pos + k]))
            self.pos += k
            remaining -= k
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class DistributedTokenLoader:
    """Each call takes one contiguous chunk and gives every rank a disjoint span (+1 for the shift)."""

    def __init__(self, stream: TokenStream, rank: int, world_size: int, device: torch.device) -> None:
        self.stream, self.rank, self.world_size, self.device = stream, rank, world_size, device

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int,
                   packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `seq_len` tokens, or with `packed` the rank's whole span as one row: the records' varlen
        batches (#1530), where documents, not rows, bound attention and seq_len only caps a document's piece."""
        local_tokens = global_tokens // (self.world_size * grad_accum_steps)
        span = local_tokens + 1
        chunk = self.stream.take(span * self.world_size)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
        row = local_tokens if packed else seq_len
        x = local[:-1].reshape(-1, row)
        y = local[1:].reshape(-1, row)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# --- locating data ---------------------------------------------------------------------


def find_tokenizer(data_dir: Path, vocab_size: int) -> Path:
    """The tokenizer for a shard directory: its manifest, or the challenge's layout."""
    manifest = read_manifest(data_dir)
    if manifest and (data_dir / manifest["tokenizer"]).is_file():
        return data_dir / manifest["tokenizer"]
    names = [f"fineweb_{vocab_size}_bpe.model"]
    for folder in (data_dir, data_dir.parent, data_dir.parent.parent / "tokenizers", data_dir.parent / "tokenizers"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    models = sorted(data_dir.glob("*.model"))
    if len(models) == 1:
        return models[0]
    raise DataError(
        f"no tokenizer found for {data_dir} (looked for {names[0]} beside it and in ../tokenizers)",
        hint="Pass --tokenizer PATH to the SentencePiece .model the shards were made with.",
    )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise concurrent builders of the same cache entry (ablation workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_dataset_dir(vocab_size: int, transform: TextTransform | None) -> Path:
    suffix = f"-{transform.name}" if transform else ""
    return cache_dir() / "data" / f"{corpus_id()}-sp{vocab_size}{suffix}"


def ensure_embedded_dataset(vocab_size: int, transform: TextTransform | None = None) -> Path:
    """Tokenize the embedded corpus once per (vocab, transform) and cache the shards."""
    out = embedded_dataset_dir(vocab_size, transform)
    with file_lock(out.with_suffix(".lock")):
        manifest = read_manifest(out)
        if manifest is None or manifest.get("format") != DATASET_FORMAT:
            docs = embedded_documents()
            train = [d for d in docs if not is_validation_document(d)]
            val = [d for d in docs if is_validation_document(d)]
            build_dataset(out, train, val, vocab_size, transform=transform, source="embedded")
    return out


def load_dataset(
    data_dir: str | Path | None,
    tokenizer: str | Path | None,
    vocab_size: int,
    transform: TextTransform | None = None,
    train_shards: int | None = None,
) -> Dataset:
    """Open shards (or build the embedded corpus), check them, and compute per-token bytes."""
    if data_dir is None:
        directory = ensure_embedded_dataset(vocab_size, transform)
        source = "embedded"
    else:
        directory = Path(data_dir)
        source = "shards"
        if not directory.is_dir():
            raise DataError(f"data directory not found: {directory}",
                            hint="Pass --data DIR holding fineweb_train_*.bin and fineweb_val_*.bin.")
    train_files = shards.list_shards(directory, shards.TRAIN_GLOB)
    val_files = shards.list_shards(directory, shards.VAL_GLOB)
    if not train_files or not val_files:
        raise DataError(
            f"{directory} has {len(train_files)} training and {len(val_files)} validation shards; both are needed",
            hint="Expected fineweb_train_*.bin and fineweb_val_*.bin (pgolf data fineweb / pgolf data text make them).",
        )
    if train_shards is not None:
        train_files = train_files[:train_shards]
    tok_path = Path(tokenizer) if tokenizer else find_tokenizer(directory, vocab_size)
    sp = load_tokenizer(tok_path, vocab_size)
    ledger = DataLedger()
    parts = []
    for path in val_files:
        ledger.record("eval", path)
        parts.append(np.asarray(shards.read_shard(path, vocab_size), dtype=np.int64))
    val_tokens = np.concatenate(parts)
    bytes_files = shards.list_shards(directory, shards.VAL_BYTES_GLOB)
    manifest = read_manifest(directory) or {}
    wanted = transform.name if transform else None
    if "transform" in manifest and manifest["transform"] != wanted:
        # Otherwise toggling a transform off in an ablation would silently rerun the same data.
        raise DataError(f"the shards in {directory} were made with text transform {manifest['transform'] or 'none'}, "
                        f"but the recipe asks for {wanted or 'none'}",
                        hint="Enable the matching technique (e.g. casefold) or point --data at shards made for this recipe.")
    if bytes_files:
        val_bytes = np.concatenate([np.asarray(shards.read_shard(p), dtype=np.int32) for p in bytes_files])
        if val_bytes.shape != val_tokens.shape:
            raise DataError(f"byte sidecar has {val_bytes.size} entries but the validation shards hold {val_tokens.size} tokens",
                            hint="Rebuild the sidecar together with the validation shards.")
        byte_source = "sidecar"
    else:
        val_bytes = stream_bytes(val_tokens, build_byte_tables(sp, vocab_size))
        byte_source = "lut"
    bos_id = int(sp.bos_id()) if int(sp.bos_id()) >= 0 else 1
    return Dataset(
        dir=directory,
        tokenizer_path=tok_path,
        vocab_size=vocab_size,
        bos_id=bos_id,
        train_files=train_files,
        val_files=val_files,
        val_tokens=val_tokens,
        val_bytes=val_bytes,
        byte_source=byte_source,
        # Shards without a pgolf manifest (the challenge's CaseOps export) are taken to be made
        # with the transform the run asks for; the transform's own checks guard that.
        transform=manifest.get("transform", transform.name if transform else None),
        lossless=bool(manifest.get("lossless", transform.lossless if transform else True)),
        source=source,
        ledger=ledger,
    )


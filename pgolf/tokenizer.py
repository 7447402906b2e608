"""SentencePiece tokenizers: trained with the challenge's settings, loaded with clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from pgolf.errors import DataError

BOS_ID = 1

# The official tokenizers' trainer settings (data/download_hf_docs_and_tokenize.py).
CHALLENGE_TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model; check it matches the recipe's vocab size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}", hint="Pass --tokenizer PATH to a SentencePiece .model file.")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises plain RuntimeError/OSError on bad files
        raise DataError(f"cannot load tokenizer {path}: {exc}", hint="Is this a SentencePiece .model file?") from None
    if vocab_size is not None and int(sp.vocab_size()) != vocab_size:
        raise DataError(
            f"tokenizer {path.name} has vocab size {sp.vocab_size()} but the recipe says model.vocab_size={vocab_size}",
            hint=f"Use --set model.vocab_size={sp.vocab_size()} or a matching tokenizer.",
        )
    return sp


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    user_symbols: Sequence[str] = (),
    threads: int | None = None,
) -> Path:
    """Train a BPE tokenizer with the challenge's settings; returns the .model path."""
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(CHALLENGE_TRAINER_SETTINGS)
    if user_symbols:
        kwargs["user_defined_symbols"] = list(user_symbols)
    cleaned = (t.replace("\x00", " ").strip() for t in texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in cleaned if t),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        num_threads=threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
        **kwargs,
    )
    return model_prefix.with_suffix(".model")

"""SentencePiece tokenizers: trained with the challenge's settings, loaded with clear errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from pgolf.errors import DataError

BOS_ID = 1
MAX_NORMALIZATION_PASSES = 8

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


def text_normalizer(tokenizer: str | Path | None = None) -> Callable[[str], str]:
    """SentencePiece's own normaliser, returning the text its tokens decode back to.

    A SentencePiece model never reproduces text its normaliser changes (NFKC, runs of
    whitespace, leading and trailing whitespace, deleted control characters), so pgolf stores
    documents in this canonical form: then the leading-space rule and a transform's byte
    sidecar both count exactly the stored document's UTF-8 bytes. Uses the model's normaliser
    when one is given, else the challenge trainer's (nmt_nfkc, extra whitespace removed).
    """
    common = {"add_dummy_prefix": False, "escape_whitespaces": False}
    if tokenizer is not None:
        normalizer = spm.SentencePieceNormalizer(model_file=str(tokenizer), **common)
    else:
        normalizer = spm.SentencePieceNormalizer(rule_name=str(CHALLENGE_TRAINER_SETTINGS["normalization_rule_name"]),
                                                 remove_extra_whitespaces=True, **common)

    def canonical(text: str) -> str:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"a document is not valid Unicode text ({exc.reason} at character {exc.start})",
                            hint="Lone surrogates usually come from broken JSON escapes; clean the input.") from None
        # One pass is not always a fixed point (a deleted control character can bring a letter
        # and a combining mark together for NFKC to compose), so repeat until nothing changes.
        for _ in range(MAX_NORMALIZATION_PASSES):
            normalized = normalizer.normalize(text)
            if normalized == text:
                return text
            text = normalized
        raise DataError(f"SentencePiece normalisation did not settle after {MAX_NORMALIZATION_PASSES} passes "
                        f"on the text starting {text[:60]!r}")

    return canonical

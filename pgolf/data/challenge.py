"""The challenge's own data, as its logs print it: what a complete validation set looks like.

Reviewers fingerprinted a run's data by its `val_tokens` (a truncated or re-partitioned validation
split changes it) and its training shard count. `pgolf doctor` checks shards against these figures
before a run; every run's `data_fingerprint` audit checks the stream it scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL_TRAIN_SHARDS = 80  # `train_shards: 80` in every record's log; the challenge downloader's default


@dataclass(frozen=True)
class ValReference:
    """A challenge validation set as its logs print it: `val_tokens` is the targets left after the
    stream (tokens - 1 targets) is cut to whole `window`-token windows; window 1 is the whole stream."""

    variant: str
    vocab_size: int
    targets: int
    window: int
    source: str

    def matches(self, stream_tokens: int) -> bool:
        return self.targets <= stream_tokens - 1 < self.targets + self.window

    def expected(self) -> str:
        if self.window == 1:
            return f"{self.targets + 1:,} tokens"
        return (f"{self.targets + 1:,} to {self.targets + self.window:,} tokens (its logs' val_tokens "
                f"{self.targets:,} at {self.window}-token windows)")


VAL_REFERENCES = (
    ValReference("sp1024", 1024, 63_779_840, 1024,
                 "records/track_10min_16mb/2026-03-17_NaiveBaseline/train.log (val_loader ... tokens:63779840)"),
    ValReference("sp8192", 8192, 40_540_160, 2048,
                 "records/track_10min_16mb/2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2 logs (eval_seq_len 2048)"),
    ValReference("sp8192 CaseOps", 8192, 47_853_343, 1,
                 "PRs #2014/#2140 with EVAL_INCLUDE_TAIL=1 (47,851,520 at 2048-token windows)"),
)
# Validation counts reviewers caught in submissions, as (val_tokens, window, what it meant).
KNOWN_BAD_VAL = (
    (9_662_464, 2048, "the 10k-document prep or a truncated shard (#1923 v1)"),
    (36_562_944, 2048, "a parallel data build's non-canonical validation split (#2109)"),
)


def val_reference(vocab_size: int, stream_tokens: int) -> ValReference | None:
    """The challenge validation set of this vocabulary that a stream of this length is, if any."""
    return next((r for r in VAL_REFERENCES if r.vocab_size == vocab_size and r.matches(stream_tokens)), None)


def known_bad_val(stream_tokens: int) -> str | None:
    """What a validation count reviewers caught in a submission meant, if this is one."""
    return next((what for bad, window, what in KNOWN_BAD_VAL if bad <= stream_tokens - 1 < bad + window), None)


def is_challenge_export(manifest: dict[str, Any] | None) -> bool:
    """Shards from the challenge's export: fetched by `pgolf data fineweb`, or without a pgolf manifest."""
    return manifest is None or manifest.get("source") == "fineweb"


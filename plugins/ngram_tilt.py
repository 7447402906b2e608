"""Token-only n-gram tilt (#2130/#2135): boost the network's probability of a token an online n-gram is sure of.

A causal token n-gram over the validation stream proposes a hint h_t at position t when its
confidence reaches `threshold`; the scored distribution becomes

    p'(a) = exp(β·[a = h_t]) · p(a) / Z_t,    Z_t = 1 + q_t (e^β − 1),    q_t = p(h_t),

a full distribution over the vocabulary, so the score is  nll' = nll − β·[y_t = h_t] + log1p(q_t (e^β − 1)).

The n-gram is the records' (their `online_ngram_state.c`, vendored from PR #1145), reproduced
value for value with numpy sorts instead of C hash tables:

* one order only (16: a 15-token context, no back-off to shorter ones); the context is a 64-bit key,
  the XOR of each context token times a per-slot constant, and a (context, token) pair has a key of
  its own; both keys, collisions included, are the record's;
* the stream is the targets (tokens 1..N-1) with the first target pushed once before it, so the
  first hint can come at the 15th target; counts run across documents and are never reset;
* per context: the number of earlier occurrences (`total`) and the follower with the largest pair
  count so far (`top`; ties keep the earlier one). The hint at t is that top follower from the
  occurrences before t, with confidence top_count/total in float32; the counts learn t only after.

The records also had within-word and word-start experts and an agreement bonus; they gate on
properties of the token being scored (ruled target-dependent; #2140's first logs had them on), so
they are not offered: their counters are reported at 0 and the mixer-gates audit would fail any
mixer that fired such a channel.

The network's q_t comes from the scorer itself: hinted positions are added to the positions whose
full log-distribution the scorer records (`TokenScores.probe_at`, a duty of every scorer, TTT's
included), so the tilt applies to whatever scored the stream, as #2135 tilts its TTT scores. That
costs one vocabulary-sized row per hinted position, fine at pgolf's scales (a full-validation run,
about 628k hinted positions at vocab 8192, would want the scorer to gather q_t alone). The hint
construction is timed as its own evaluation sub-stage, inside the eval budget (#2135 ran it inside
its timer: `ngram_hint_precompute_outside: False`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from pgolf.api import EvalWindows, GateCounts, PgolfError, RunContext, Scorer, Technique, TokenScores, hookimpl

# online_ngram_state.c (#2135, lines 7-14 and 16): per-slot multipliers of the context key, and the pair mix.
ROLLING_COEFFS = np.array([
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389,
    2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
], dtype=np.uint64)
PAIR_MIX = np.uint64(1000003)
TARGET_DEPENDENT_CHANNELS = ("within", "word", "agree2plus")  # the record's log names; never offered here


@dataclass
class NgramTiltConfig:
    order: int = 16  # TOKEN_ORDER (#2135 train_gpt.py:315): context of order-1 tokens
    threshold: float = 0.8  # TOKEN_THRESHOLD: least confidence that yields a hint
    boost: float = 2.625  # TOKEN_BOOST: β

    def validate(self) -> tuple[str, str] | None:
        if not 1 <= self.order <= ROLLING_COEFFS.size + 1:
            return "order", f"order must lie in 1..{ROLLING_COEFFS.size + 1} (one multiplier per context slot)"
        if not 0.0 < self.threshold <= 1.0:
            return "threshold", "threshold must lie in (0, 1]"
        if not self.boost > 0.0:
            return "boost", "boost must be positive"
        return None


# --- the n-gram: keys, counts, hints ---------------------------------------------------------


def context_keys(targets: np.ndarray, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit context key before each target, whether its context is full): the record's rolling key
    over the last `ctx_len` tokens of [targets[0], targets[:t]], oldest token in slot 0."""
    n = targets.shape[0]
    full = np.zeros(n, dtype=bool)
    keys = np.zeros(n, dtype=np.uint64)
    if ctx_len == 0:
        full[:] = True
        return keys, full
    stream = np.concatenate([targets[:1], targets]).astype(np.uint64)  # the seeded first target, then all
    count = n - ctx_len + 1  # targets ctx_len-1 .. n-1 have a full context
    if count <= 0:
        return keys, full
    acc = np.zeros(count, dtype=np.uint64)
    for slot in range(ctx_len):
        acc ^= stream[slot : slot + count] * ROLLING_COEFFS[slot]  # uint64 products wrap as C's do
    keys[ctx_len - 1 :] = acc
    full[ctx_len - 1 :] = True
    return keys, full


def occurrence_index(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stable sort order, dense group id and index within the group of each sorted element)."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    first = np.r_[True, sk[1:] != sk[:-1]] if sk.size else np.zeros(0, dtype=bool)
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    local = np.arange(sk.size) - starts[group] if sk.size else np.zeros(0, dtype=np.int64)
    return order, group, local


def ngram_predictions(targets: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(top follower, its confidence as float32) of every target's context from the targets before it;
    0 and 0.0 where the context is not full or was never seen."""
    targets = np.asarray(targets, dtype=np.int64)
    n = targets.shape[0]
    top_tok = np.zeros(n, dtype=np.int64)
    top_prob = np.zeros(n, dtype=np.float32)
    ctx_len = order - 1
    keys, full = context_keys(targets, ctx_len)
    idx = np.flatnonzero(full)
    m = idx.size
    if m == 0:
        return top_tok, top_prob
    ck = keys[idx]
    with np.errstate(over="ignore"):
        pk = (ck * PAIR_MIX) ^ (targets[idx].astype(np.uint64) * ROLLING_COEFFS[ctx_len % ROLLING_COEFFS.size])
    p_order, _, p_local = occurrence_index(pk)
    pair_count = np.empty(m, dtype=np.int64)
    pair_count[p_order] = p_local + 1  # the pair's count once this target is counted
    c_order, group, local = occurrence_index(ck)
    # the running top of each context: the largest pair count so far, the earliest on ties (the C
    # replaces its top only on a strictly larger count); a segmented running max over ranks
    pc = pair_count[c_order]
    enc = pc * (m + 1) + (m - c_order)  # larger count first, then earlier position
    by_rank = np.argsort(enc, kind="stable")
    rank = np.empty(m, dtype=np.int64)
    rank[by_rank] = np.arange(m)
    running = np.maximum.accumulate(group * m + rank) - group * m
    best = by_rank[running]  # sorted index of the current top after each element
    seen = local > 0  # the context occurred before: the state from its previous occurrence
    prev_best = best[np.flatnonzero(seen) - 1]
    where = idx[c_order[seen]]
    top_tok[where] = targets[idx[c_order[prev_best]]]
    top_prob[where] = pc[prev_best].astype(np.float32) / local[seen].astype(np.float32)
    return top_tok, top_prob


@dataclass
class Hints:
    """Hinted positions of a token stream (position p predicts tokens[p]), their tokens and confidences."""

    positions: np.ndarray
    tokens: np.ndarray
    confidence: np.ndarray


def token_hints(tokens: np.ndarray, order: int, threshold: float) -> Hints:
    """The record's hints for a stream whose targets are tokens[1:] (their index i is position i+1)."""
    top_tok, top_prob = ngram_predictions(np.asarray(tokens)[1:], order)
    gated = np.flatnonzero(top_prob >= np.float32(threshold))
    return Hints(gated + 1, top_tok[gated], top_prob[gated])


# --- the tilt ------------------------------------------------------------------------------


def tilted_nll(nll: np.ndarray, log_q: np.ndarray, hit: np.ndarray, boost: float) -> np.ndarray:
    """nll − β·[y = h] + log Z, Z = 1 + q(e^β − 1): the tilted distribution's value at the target."""
    q = np.exp(np.minimum(np.asarray(log_q, dtype=np.float64), 0.0))
    return np.asarray(nll, dtype=np.float64) - boost * np.asarray(hit, dtype=np.float64) + np.log1p(q * math.expm1(boost))


def tilted_distribution(logp: np.ndarray, hint: int, boost: float) -> np.ndarray:
    """The whole tilted log-distribution (what the normalization audit sums)."""
    out = np.asarray(logp, dtype=np.float64).copy()
    q = math.exp(min(float(out[hint]), 0.0))
    out[hint] += boost
    return out - math.log1p(q * math.expm1(boost))


# --- the technique ------------------------------------------------------------------------------


@dataclass
class TiltStats:
    positions: int = 0  # scored positions
    hinted: int = 0  # scored positions with a hint (the token channel fired)
    hits: int = 0  # of those, the hint was the target
    precompute_seconds: float = 0.0
    tokens_per_second: float = 0.0
    nll_before: float = 0.0
    nll_after: float = 0.0

    def as_metrics(self) -> dict[str, Any]:
        return {f"ngram_tilt_{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class TiltingScorer:
    """Wraps the run's scorer: hints first (timed), hinted positions probed, then the tilt applied."""

    def __init__(self, inner: Scorer, cfg: NgramTiltConfig, stats: list[TiltStats]) -> None:
        self.inner, self.cfg, self.stats = inner, cfg, stats

    @property
    def audit_tokens(self) -> int:
        return int(getattr(self.inner, "audit_tokens", 0))

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows:
        return self.inner.windows_for(windows, tokens, ctx)

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        hints = token_hints(scores.tokens, cfg.order, cfg.threshold)
        took = time.perf_counter() - start
        scores.stage_seconds["ngram_precompute"] = scores.stage_seconds.get("ngram_precompute", 0.0) + took
        audited = scores.probe_at
        scores.probe_at = audited | frozenset(hints.positions.tolist())
        try:
            self.inner(model, scores, windows, ctx)
        finally:
            scores.probe_at = audited
        stats = TiltStats(precompute_seconds=took, tokens_per_second=scores.tokens.shape[0] / max(took, 1e-9))
        mine = scores.count[hints.positions] > 0  # this rank scored them
        pos, hint = hints.positions[mine], hints.tokens[mine]
        missing = [int(p) for p in pos if int(p) not in scores.probes]
        if missing:
            raise PgolfError(f"the scorer did not record the distribution at {len(missing)} hinted position(s) "
                             f"(first: {missing[0]}), so the n-gram tilt cannot normalize there",
                             hint="A scorer must fill scores.probes at every position of scores.probe_at.")
        log_q = np.array([scores.probes[int(p)][int(h)] for p, h in zip(pos, hint, strict=True)], dtype=np.float64)
        hit = scores.tokens[pos] == hint
        stats.nll_before = float(scores.nll[pos].sum())
        scores.nll[pos] = tilted_nll(scores.nll[pos], log_q, hit, cfg.boost)
        stats.nll_after = float(scores.nll[pos].sum())
        for p, h in zip(pos.tolist(), hint.tolist(), strict=True):
            if p in audited:
                scores.probes[p] = tilted_distribution(scores.probes[p], h, cfg.boost)
            else:
                del scores.probes[p]
        covered = windows.expected_coverage(scores.tokens.shape[0]) > 0
        stats.positions = int(covered.sum())
        stats.hinted = int(covered[hints.positions].sum())
        stats.hits = int(hit.sum())
        scores.gates["ngram_tilt"] = GateCounts({"token": stats.hinted, **dict.fromkeys(TARGET_DEPENDENT_CHANNELS, 0)},
                                                must_stay_off=TARGET_DEPENDENT_CHANNELS)
        self.stats.append(stats)


class NgramTilt(Technique):
    name = "ngram_tilt"
    summary = "Tilt the scored distribution toward a causal order-16 token n-gram's confident hint (token channel only)."
    Config = NgramTiltConfig
    stage = "eval"
    after = ("ttt",)
    follows = ("PR #2130/#2135 token-only tilt from PR #1145 (628,130 of 47,851,520 positions hinted; part of "
               "#2130's stack, 1.05670); #1967's within/word channels ruled target-dependent (not offered)")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.stats: list[TiltStats] = []

    @hookimpl(wrapper=True)
    def pgolf_provide_scorer(self, ctx: RunContext) -> Generator[None, Scorer, Scorer]:
        inner = yield
        return TiltingScorer(inner, self.config, self.stats)

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        return self.stats[0].as_metrics() if self.stats else {}  # the main evaluation; later runs are audits

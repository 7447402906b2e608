"""PPM mixing: blend the network with counts of the already-scored validation stream.

``mode: token`` is a valid mixer. At position p it interpolates, Witten–Bell / PPM-C style,
context orders 1..N of the token stream *before* p over the network's softmax as the base:

    P_0(y) = p_nn(y);   P_k(y) = (c_k(y) + e·u_k·P_{k-1}(y)) / (n_k + e·u_k)   if n_k > 0, else P_{k-1}(y)

where n_k counts earlier occurrences of the k-token context, c_k(y) those followed by y, u_k the
distinct followers, and e (``escape``) how much the network is trusted over the counts (e = 1 is
Witten–Bell). Every P_k is a full distribution over the vocabulary (it sums to 1 whatever the
counts), and it depends only on tokens < p and the network's output at p. e is chosen from a
list by prefix-only statistics: each block of positions uses the value whose mixture had the
lowest NLL on everything scored before the block (the first block, with nothing scored yet,
trusts the network most). The counts of every position come from a few stable sorts of context
ids over the whole stream (no Python loop per token; `benchmarks/ppm.py`).

``mode: bytes`` reproduces the byte-level PPM mixtures of the open PRs (#1835 and its followers,
see Issue #1872): a PPM-C byte model (orders 0..5, no exclusion) mixed per byte with the network's
token log-probability spread evenly over the token's bytes, λ switched by the PPM's confidence,
and the byte log-probabilities summed into the token's score. It exists so users can reproduce
the claimed numbers and watch the normalization audit reject them: summed over the vocabulary,
the token "probabilities" it implies do not add up to 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pgolf.api import (
    LEADING_SPACE,
    GateCounts,
    RunContext,
    Technique,
    TokenScores,
    build_byte_tables,
    load_tokenizer,
    loss_and_bpb,
)

DEFAULT_ORDER = {"token": 4, "bytes": 5}
MAX_BYTE_ORDER = 7  # byte contexts are packed 8 bits per byte into one uint64 key
BYTE_BLOCK = 1 << 24  # history bytes packed at a time when building probe tables


# --- counting over the stream ---------------------------------------------------------------


@dataclass
class OrderCounts:
    """Per position p, over earlier positions q < p that share p's k-token context."""

    seen: np.ndarray  # n_k(p): earlier occurrences of the context
    hits: np.ndarray  # c_k(p): of those, followed by tokens[p]
    distinct: np.ndarray  # u_k(p): distinct tokens that followed the context
    top: np.ndarray | None = None  # largest count of one follower (the byte mode's confidence)


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """Positions sorted by key, equal keys in position order (keys are non-negative)."""
    n = keys.shape[0]
    bits = max(n - 1, 1).bit_length()
    if int(keys.max()) < 1 << (63 - bits):  # key and position fit one int64: a plain (SIMD) sort
        return np.sort((keys << bits) | np.arange(n, dtype=np.int64)) & ((1 << bits) - 1)
    return torch.sort(torch.from_numpy(keys), stable=True)[1].numpy()


@dataclass
class Grouping:
    """Positions grouped by equal context: the sort order, each group's first sorted index and size."""

    order: np.ndarray
    firsts: np.ndarray
    sizes: np.ndarray

    @classmethod
    def of(cls, keys: np.ndarray) -> Grouping:
        order = _stable_order(keys)
        sk = keys[order]
        firsts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        return cls(order, firsts, np.diff(np.r_[firsts, keys.shape[0]]))

    def per_position(self, sorted_values: np.ndarray) -> np.ndarray:
        out = np.empty_like(sorted_values)
        out[self.order] = sorted_values
        return out

    def group_ids(self) -> np.ndarray:
        """Dense id of each position's group."""
        return self.per_position(np.repeat(np.arange(self.firsts.shape[0], dtype=np.int64), self.sizes))

    def occurrences(self) -> np.ndarray:
        """For each position, how many earlier positions share its key."""
        index = np.arange(self.order.shape[0], dtype=np.int64)
        return self.per_position(index - np.repeat(self.firsts, self.sizes))

    def earlier_sum(self, values: np.ndarray) -> np.ndarray:
        """For each position, the sum of `values` over earlier positions of its group."""
        v = values[self.order]
        excl = np.cumsum(v) - v
        return self.per_position(excl - np.repeat(excl[self.firsts], self.sizes))

    def earlier_max(self, values: np.ndarray) -> np.ndarray:
        """For each position, the max of non-negative `values` over earlier positions of its group (0 if none)."""
        v = values[self.order]
        offset = np.repeat(np.arange(self.firsts.shape[0], dtype=np.int64) * (int(v.max()) + 1), self.sizes)
        acc = np.maximum.accumulate(v + offset) - offset
        shifted = np.zeros_like(acc)
        shifted[1:] = acc[:-1]
        shifted[self.firsts] = 0
        return self.per_position(shifted)


def prefix_counts(tokens: np.ndarray, max_order: int, min_order: int = 1, with_top: bool = False) -> list[OrderCounts]:
    """Context statistics of every position for orders min_order..max_order, fully vectorised.

    Context ids are built order by order: the order-k context of p is (its order-(k-1) context,
    the token k back), and one stable sort per order groups equal contexts, giving each position
    the number of earlier positions that share it. The (context, follower) pair of order k at p
    is the order-(k+1) context of p+1, so its earlier count is read off the next order's sort.
    A position with fewer than k tokens of history gets a context of its own (never seen).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    m = n + 1  # position n is a placeholder so the last position's (context, follower) pair has an id
    vocab = int(tokens.max(initial=0)) + 1
    back = np.full(m, vocab, dtype=np.int64)  # the token k back; `vocab` marks "before the stream"
    ids = np.zeros(m, dtype=np.int64)
    current = Grouping.of(ids) if min_order == 0 else None
    seen = current.occurrences() if current is not None else None
    out: list[OrderCounts] = []
    for k in range(1, max_order + 2):
        back[:] = vocab
        back[k:] = tokens[: m - k]
        following = Grouping.of(ids * (vocab + 1) + back)
        following_seen = following.occurrences()
        if current is not None and seen is not None and k - 1 >= min_order:
            hits = following_seen[1:]
            first_follow = np.zeros(m, dtype=np.int64)
            first_follow[:n] = hits == 0
            follow_count = np.zeros(m, dtype=np.int64)
            follow_count[:n] = hits + 1
            top = current.earlier_max(follow_count)[:n] if with_top else None
            out.append(OrderCounts(seen[:n], hits, current.earlier_sum(first_follow)[:n], top))
        if k <= max_order:
            ids = following.group_ids()
        current, seen = following, following_seen
    return out


# --- the valid token-level mixer --------------------------------------------------------------


def mix_target_probs(p_nn: np.ndarray, orders: list[OrderCounts], escape: float) -> np.ndarray:
    """P_N(tokens[p]) for every position, from the network's probability of the same token."""
    p = np.asarray(p_nn, dtype=np.float64).copy()
    for o in orders:
        weight = escape * o.distinct
        p = np.where(o.seen > 0, (o.hits + weight * p) / np.maximum(o.seen + weight, 1e-300), p)
    return p


def choose_escapes(p_nn: np.ndarray, orders: list[OrderCounts], grid: list[float], scored: np.ndarray,
                   block: int) -> tuple[np.ndarray, np.ndarray]:
    """(mixed probability of every position's token, escape used there), e picked per block.

    Block b (positions b*block .. (b+1)*block - 1) uses the grid value with the lowest summed NLL
    over scored positions before b*block; block 0 uses the largest value (trust the network).
    Two passes over the grid keep memory at a few stream-length arrays.
    """
    n = p_nn.shape[0]
    blocks = -(-n // block)
    starts = np.arange(blocks) * block
    loss = np.zeros((len(grid), blocks))
    for g, e in enumerate(grid):
        nll = np.where(scored, -np.log(mix_target_probs(p_nn, orders, e)), 0.0)
        loss[g] = np.add.reduceat(nll, starts)
    before = np.cumsum(loss, axis=1) - loss  # NLL of everything before each block
    choice = np.argmin(before, axis=0)
    choice[0] = int(np.argmax(grid))
    per_position = np.repeat(choice, block)[:n]
    mixed = np.empty(n)
    for g, e in enumerate(grid):
        here = per_position == g
        if here.any():
            mixed[here] = mix_target_probs(p_nn, orders, e)[here]
    return mixed, np.asarray(grid, dtype=np.float64)[per_position]


def mixed_distribution(tokens: np.ndarray, p: int, p_nn: np.ndarray, max_order: int, escape: float) -> np.ndarray:
    """The full mixed distribution at position p (what the audits probe), counted directly."""
    tokens = np.asarray(tokens, dtype=np.int64)
    q = np.asarray(p_nn, dtype=np.float64)
    vocab = q.shape[0]
    matches = np.arange(1, p, dtype=np.int64)
    for k in range(1, max_order + 1):
        if p - k < 0:
            break
        matches = matches[matches - k >= 0]
        matches = matches[tokens[matches - k] == tokens[p - k]]
        counts = np.bincount(tokens[matches], minlength=vocab).astype(np.float64)
        seen = counts.sum()
        if seen > 0:
            weight = escape * np.count_nonzero(counts)
            q = (counts + weight * q) / (seen + weight)
    return q


# --- the byte-level mixture of the open PRs (invalid by design) --------------------------------


@dataclass
class TokenBytes:
    """Byte strings of token ids under the challenge's leading-space rule (same count as the LUT)."""

    flat: np.ndarray  # uint8, every piece's bytes back to back
    offset: np.ndarray  # int64 [V+1]
    lead: np.ndarray  # bool [V]: piece starts with "▁" (a space unless after a boundary)
    boundary: np.ndarray  # bool [V]

    @classmethod
    def from_tokenizer(cls, sp: Any, vocab: int) -> TokenBytes:
        tables = build_byte_tables(sp, vocab)
        pieces: list[bytes] = []
        for tid in range(vocab):
            if tid >= sp.vocab_size() or tables.is_boundary[tid]:
                pieces.append(b"")
            elif sp.is_byte(tid):
                pieces.append(bytes([int(sp.id_to_piece(tid)[3:5], 16)]))
            else:
                piece = sp.id_to_piece(tid)
                pieces.append(piece[1:].encode() if piece.startswith(LEADING_SPACE) else piece.encode())
        offset = np.zeros(vocab + 1, dtype=np.int64)
        offset[1:] = np.cumsum([len(b) for b in pieces])
        flat = np.frombuffer(b"".join(pieces), dtype=np.uint8).copy()
        return cls(flat, offset, tables.has_leading_space[:vocab], tables.is_boundary[:vocab])

    def of(self, token: int, prev: int) -> bytes:
        space = b" " if self.lead[token] and not self.boundary[prev] else b""
        return space + self.flat[self.offset[token] : self.offset[token + 1]].tobytes()

    def stream(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bytes of positions 1..n-1 as targets, back to back; start of each position's bytes [n+1])."""
        tokens = np.asarray(tokens, dtype=np.int64)
        y, prev = tokens[1:], tokens[:-1]
        space = self.lead[y] & ~self.boundary[prev]
        piece_len = self.offset[y + 1] - self.offset[y]
        length = np.zeros(tokens.shape[0], dtype=np.int64)
        length[1:] = space + piece_len
        start = np.zeros(tokens.shape[0] + 1, dtype=np.int64)
        start[1:] = np.cumsum(length)
        out = np.full(int(start[-1]), 0x20, dtype=np.uint8)
        total = int(piece_len.sum())
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(piece_len) - piece_len, piece_len)
        dest = np.repeat(start[1:-1] + space, piece_len) + within
        out[dest] = self.flat[np.repeat(self.offset[y], piece_len) + within]
        return out, start


@dataclass
class ByteMixConfig:
    order: int
    lambda_hi: float
    lambda_lo: float
    threshold: float


def byte_ppm_logprobs(stream: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """PPM-C without exclusion over a byte stream: (log p of each byte, confidence of its context).

    From the highest order down: an unseen context is skipped; a seen context either holds the
    byte (probability c/(n+u), times the escapes so far) or escapes with u/(n+u); below order 0
    the byte gets 1/256. Confidence is max count/(n+u) of the highest seen context.
    """
    counts = prefix_counts(stream, order, min_order=0, with_top=True)
    size = stream.shape[0]
    logp = np.zeros(size)
    escape = np.zeros(size)
    confidence = np.zeros(size)
    found = np.zeros(size, dtype=bool)
    have_confidence = np.zeros(size, dtype=bool)
    for o in reversed(counts):
        assert o.top is not None
        avail = ~found & (o.seen > 0)
        total = np.maximum(o.seen + o.distinct, 1).astype(np.float64)
        first = avail & ~have_confidence
        confidence = np.where(first, o.top / total, confidence)
        have_confidence |= first
        hit = avail & (o.hits > 0)
        logp = np.where(hit, escape + np.log(np.maximum(o.hits, 1) / total), logp)
        found |= hit
        escape = np.where(avail & (o.hits == 0), escape + np.log(np.maximum(o.distinct, 1) / total), escape)
    logp = np.where(found, logp, escape - math.log(256.0))
    return logp, confidence


def gate(confidence: np.ndarray | float, cfg: ByteMixConfig) -> np.ndarray:
    """The network's weight λ: low where the PPM is confident."""
    return np.where(np.asarray(confidence) >= cfg.threshold, cfg.lambda_lo, cfg.lambda_hi)


def byte_mix_nll(tokens: np.ndarray, nn_nll: np.ndarray, table: TokenBytes, cfg: ByteMixConfig,
                 fired: dict[str, int] | None = None) -> np.ndarray:
    """Per-position score of the byte mixture: minus the sum of its bytes' mixed log-probabilities.
    `fired` receives how many bytes of the stream took each λ (the gate's two channels)."""
    stream, start = table.stream(tokens)
    ppm, confidence = byte_ppm_logprobs(stream, cfg.order)
    length = np.diff(start)
    owner = np.repeat(np.arange(tokens.shape[0]), length)
    nn_byte = -nn_nll[owner] / length[owner]
    lam = gate(confidence, cfg)
    if fired is not None:
        confident = int((confidence >= cfg.threshold).sum())
        fired.update(confident_bytes=confident, other_bytes=int(confidence.shape[0]) - confident)
    mixed = np.logaddexp(np.log(lam) + nn_byte, np.log1p(-lam) + ppm)
    return np.bincount(owner, weights=-mixed, minlength=tokens.shape[0])


def _context_tables(history: np.ndarray, wanted: dict[int, set[bytes]]) -> dict[tuple[int, bytes], np.ndarray]:
    """Follower counts (256 per context) over `history` for the wanted contexts of each order."""
    tables: dict[tuple[int, bytes], np.ndarray] = {}
    for k, contexts in wanted.items():
        keys = np.array(sorted(int.from_bytes(c, "little") for c in contexts), dtype=np.uint64)
        found: dict[int, np.ndarray] = {}
        for lo in range(k, history.shape[0], BYTE_BLOCK):
            hi = min(lo + BYTE_BLOCK, history.shape[0])
            packed = np.zeros(hi - lo, dtype=np.uint64)
            for j in range(1, k + 1):  # byte j back sits in bits 8(k-j): the context read oldest-first
                packed |= history[lo - j : hi - j].astype(np.uint64) << np.uint64(8 * (k - j))
            hit = np.isin(packed, keys)
            pairs = packed[hit] * np.uint64(256) + history[lo:hi][hit].astype(np.uint64)
            uniq, cnt = np.unique(pairs, return_counts=True)
            for pair, c in zip(uniq.tolist(), cnt.tolist(), strict=True):
                found.setdefault(pair >> 8, np.zeros(256, dtype=np.int64))[pair & 255] += c
        for c in contexts:
            key = int.from_bytes(c, "little")
            tables[(k, c)] = found.get(key, np.zeros(256, dtype=np.int64))
    return tables


def byte_mix_distribution(tokens: np.ndarray, p: int, nn_logp: np.ndarray, table: TokenBytes,
                          cfg: ByteMixConfig) -> np.ndarray:
    """What the byte mixture claims for every token at position p: log of the product of its
    bytes' mixed probabilities (each byte also counted for the token's later bytes, as the
    stream computation does). Summed over the vocabulary this is not 1."""
    stream, start = table.stream(tokens[: p + 1])
    history = stream[: start[p]]
    prev = int(tokens[p - 1])
    vocab = nn_logp.shape[0]
    candidates = [table.of(t, prev) for t in range(vocab)]
    tail = history[-cfg.order :].tobytes() if cfg.order else b""
    wanted: dict[int, set[bytes]] = {k: set() for k in range(cfg.order + 1)}
    for cand in candidates:
        for j in range(len(cand)):
            full = tail + cand[:j]
            for k in range(cfg.order + 1):
                if history.shape[0] + j >= k:
                    wanted[k].add(full[len(full) - k :] if k else b"")
    tables = _context_tables(history, wanted)
    out = np.zeros(vocab)
    for t, cand in enumerate(candidates):
        own: dict[tuple[int, bytes], np.ndarray] = {}
        total = 0.0
        for j, b in enumerate(cand):
            full = tail + cand[:j]
            logp, esc, conf, done = 0.0, 0.0, None, False
            for k in range(cfg.order, -1, -1):
                if history.shape[0] + j < k:
                    continue
                key = (k, full[len(full) - k :] if k else b"")
                counts = tables[key] + own[key] if key in own else tables[key]
                seen, distinct = int(counts.sum()), int(np.count_nonzero(counts))
                if seen == 0:
                    continue
                denom = seen + distinct
                if conf is None:
                    conf = int(counts.max()) / denom
                if counts[b] > 0:
                    logp, done = esc + math.log(counts[b] / denom), True
                    break
                esc += math.log(distinct / denom)
            if not done:
                logp = esc - math.log(256.0)
            lam = float(gate(conf or 0.0, cfg))
            nn = nn_logp[t] / len(cand)
            total += float(np.logaddexp(math.log(lam) + nn, math.log1p(-lam) + logp))
            for k in range(cfg.order + 1):
                if history.shape[0] + j >= k:
                    key = (k, full[len(full) - k :] if k else b"")
                    own.setdefault(key, np.zeros(256, dtype=np.int64))[b] += 1
        out[t] = total
    return out


# --- the technique ------------------------------------------------------------------------------


@dataclass
class PPMConfig:
    mode: Literal["token", "bytes"] = "token"
    order: int | None = None  # context orders 1..order (token: 4); bytes: orders 0..order (5, PR #1835)
    # token mode: candidate weights e of the network below every seen context (1 = Witten–Bell);
    # each block of `escape_block` positions uses the one best on the text scored before it
    escape: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0])
    escape_block: int = 4096
    lambda_hi: float = 0.9  # bytes mode (PR #1835): network weight when the PPM is not confident
    lambda_lo: float = 0.05  # bytes mode: network weight when it is
    threshold: float = 0.9  # bytes mode: confidence that switches λ

    @property
    def effective_order(self) -> int:
        return self.order if self.order is not None else DEFAULT_ORDER[self.mode]

    def validate(self) -> tuple[str, str] | None:
        if self.effective_order < (1 if self.mode == "token" else 0):
            return "order", "order must be at least 1 (token mode) or 0 (bytes mode)"
        if self.mode == "bytes" and self.effective_order > MAX_BYTE_ORDER:
            return "order", f"bytes mode supports orders up to {MAX_BYTE_ORDER}"
        if not self.escape or min(self.escape) <= 0:
            return "escape", "escape must be a non-empty list of positive numbers"
        if self.escape_block <= 0:
            return "escape_block", "escape_block must be positive"
        if not (0 < self.lambda_lo < 1 and 0 < self.lambda_hi < 1):
            return "lambda_hi", "lambda_hi and lambda_lo must lie strictly between 0 and 1"
        return None


@dataclass
class PPMStats:
    mode: str
    order: int
    nn_bpb: float
    mixed_bpb: float
    seconds: float
    final_escape: float | None  # token mode: the escape the last block used

    def as_metrics(self) -> dict[str, Any]:
        return {f"ppm_{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class PPM(Technique):
    name = "ppm"
    summary = "Mix the network with a PPM model of the already-scored stream (token: valid; bytes: the rejected PRs)."
    Config = PPMConfig
    stage = "eval"
    follows = "token: PR #1914 idea (normalized); bytes: PRs #1835/#1991/#2098, ruled invalid (Issue #1872)"

    def pgolf_on_scores(self, scores: TokenScores, ctx: RunContext) -> None:
        start = time.perf_counter()
        cfg = self.config
        order = cfg.effective_order
        scored = scores.scored
        before = loss_and_bpb(*scores.totals()) if scored.any() else (float("nan"), float("nan"))
        if cfg.mode == "token":
            counts = prefix_counts(scores.tokens, order)
            mixed, escape = choose_escapes(np.exp(-scores.nll), counts, cfg.escape, scored, cfg.escape_block)
            scores.nll[scored] = -np.log(mixed[scored])
            fired = {f"order_{k}": int((o.seen[scored] > 0).sum()) for k, o in enumerate(counts, start=1)}
            for p, logp in scores.probes.items():
                scores.probes[p] = np.log(mixed_distribution(scores.tokens, p, np.exp(logp), order, escape[p]))
            final_escape = float(escape[np.flatnonzero(scored)[-1]]) if scored.any() else None
        else:
            final_escape = None
            table = TokenBytes.from_tokenizer(load_tokenizer(ctx.data.tokenizer_path), ctx.recipe.model.vocab_size)
            mix = ByteMixConfig(order, cfg.lambda_hi, cfg.lambda_lo, cfg.threshold)
            fired = {}
            scores.nll[scored] = byte_mix_nll(scores.tokens, scores.nll, table, mix, fired)[scored]
            for p, logp in scores.probes.items():
                scores.probes[p] = byte_mix_distribution(scores.tokens, p, logp, table, mix)
        scores.gates[self.name] = GateCounts(fired)  # positions each order's context was seen / bytes per λ
        after = loss_and_bpb(*scores.totals()) if scored.any() else (float("nan"), float("nan"))
        ctx.stash.setdefault(self.name, []).append(
            PPMStats(cfg.mode, order, before[1], after[1], time.perf_counter() - start, final_escape))

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        runs = ctx.stash.get(self.name, [])
        return runs[0].as_metrics() if runs else {}  # the main evaluation; later runs are audits

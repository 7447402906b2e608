"""PPM mixing: exact prefix counts, a normalized causal token mixer, and the byte mode the audit rejects."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from pgolf import compliance
from pgolf.data.bpb import build_byte_tables, stream_bytes
from pgolf.data.tokenizer import load_tokenizer
from pgolf.scores import TokenScores, plain_windows
from pgolf_plugins.ppm import (
    ByteMixConfig,
    TokenBytes,
    byte_mix_distribution,
    byte_mix_nll,
    byte_ppm_logprobs,
    choose_escapes,
    mix_target_probs,
    mixed_distribution,
    prefix_counts,
)


def softmax_rows(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    logits = rng.normal(size=(n, vocab)) * 2
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize(("vocab", "n"), [(2, 300), (5, 400), (60, 500)])
def test_prefix_counts_equal_a_table_updated_after_each_position(vocab, n):
    tokens = np.random.default_rng(vocab).integers(0, vocab, size=n)
    orders = prefix_counts(tokens, 4, min_order=0, with_top=True)
    for k, o in enumerate(orders):
        table: dict[tuple, Counter] = defaultdict(Counter)
        for p in range(n):
            if p < k:  # not k tokens of history yet: never seen
                assert o.seen[p] == o.hits[p] == o.distinct[p] == o.top[p] == 0
                continue
            followers = table[tuple(tokens[p - k : p])]
            assert (o.seen[p], o.hits[p], o.distinct[p]) == (sum(followers.values()), followers[tokens[p]], len(followers))
            assert o.top[p] == max(followers.values(), default=0)
            followers[tokens[p]] += 1  # updated only after position p was scored


def test_the_token_mixer_is_a_full_distribution_and_the_score_is_its_value_at_the_target():
    rng = np.random.default_rng(0)
    vocab, n = 7, 600
    tokens = rng.integers(0, vocab, size=n)
    p_nn = softmax_rows(rng, n, vocab)
    mixed = mix_target_probs(p_nn[np.arange(n), tokens], prefix_counts(tokens, 3), escape=1.5)
    for p in (1, 2, 3, 10, 299, 599):
        q = mixed_distribution(tokens, p, p_nn[p], 3, 1.5)
        assert q.sum() == pytest.approx(1.0, abs=1e-12) and (q > 0).all()
        assert q[tokens[p]] == pytest.approx(mixed[p], rel=1e-12)


def test_the_mixer_at_p_ignores_every_token_after_p():
    rng = np.random.default_rng(1)
    vocab, n, cut = 6, 500, 250
    tokens = rng.integers(0, vocab, size=n)
    p_nn = softmax_rows(rng, n, vocab)
    base = mix_target_probs(p_nn[np.arange(n), tokens], prefix_counts(tokens, 4), 1.0)
    perturbed = tokens.copy()
    perturbed[cut + 1 :] = rng.integers(0, vocab, size=n - cut - 1)
    other = mix_target_probs(p_nn[np.arange(n), perturbed], prefix_counts(perturbed, 4), 1.0)
    np.testing.assert_array_equal(base[: cut + 1], other[: cut + 1])


def test_each_block_uses_the_escape_best_on_the_text_scored_before_it():
    rng = np.random.default_rng(3)
    tokens = np.tile(rng.integers(0, 40, size=150), 12)
    p_nn = rng.uniform(0.01, 0.1, size=tokens.size)
    scored = np.ones(tokens.size, dtype=bool)
    scored[:1] = False
    orders = prefix_counts(tokens, 3)
    grid = [1.0, 8.0, 64.0]
    mixed, escape = choose_escapes(p_nn, orders, grid, scored, block=200)
    candidates = {e: mix_target_probs(p_nn, orders, e) for e in grid}
    assert (escape[:200] == 64.0).all()  # nothing scored yet: trust the network
    for b in range(1, -(-tokens.size // 200)):
        prefix = np.arange(b * 200)
        best = min(grid, key=lambda e: -np.log(candidates[e][prefix][scored[prefix]]).sum())
        assert (escape[b * 200 : (b + 1) * 200] == best).all()
    for e in grid:
        np.testing.assert_array_equal(mixed[escape == e], candidates[e][escape == e])
    cut = 777  # the choice at p never looks past p
    perturbed = tokens.copy()
    perturbed[cut + 1 :] = rng.integers(0, 40, size=tokens.size - cut - 1)
    other, _ = choose_escapes(p_nn, prefix_counts(perturbed, 3), grid, scored, block=200)
    np.testing.assert_array_equal(mixed[: cut + 1], other[: cut + 1])


def test_unseen_contexts_keep_the_network_and_a_large_escape_tends_to_it():
    rng = np.random.default_rng(2)
    tokens = np.arange(50) % 50  # no context ever repeats
    p = rng.uniform(0.01, 0.5, size=50)
    np.testing.assert_array_equal(mix_target_probs(p, prefix_counts(tokens, 4), 1.0), p)
    repeated = np.tile(np.arange(5), 40)
    q = rng.uniform(0.01, 0.5, size=repeated.size)
    assert np.abs(mix_target_probs(q, prefix_counts(repeated, 4), 1e9) - q).max() < 1e-6
    learnt = mix_target_probs(q, prefix_counts(repeated, 4), 1.0)
    assert learnt[100:].min() > 0.9  # a stream that repeats itself is predicted by its counts


# --- the byte mode of the open PRs ------------------------------------------------------------


def toy_bytes() -> TokenBytes:
    """Vocabulary: 0 = BOS (a boundary, no bytes), 1 = "a", 2 = "ab", 3 = "b"."""
    pieces = [b"", b"a", b"ab", b"b"]
    offset = np.cumsum([0, *map(len, pieces)])
    return TokenBytes(np.frombuffer(b"".join(pieces), dtype=np.uint8).copy(), offset,
                      np.zeros(4, dtype=bool), np.array([True, False, False, False]))


def test_byte_ppm_is_ppm_c_with_escapes_and_a_uniform_floor():
    stream = np.frombuffer(b"abab", dtype=np.uint8)
    logp, confidence = byte_ppm_logprobs(stream, 1)
    # byte 0: nothing seen -> 1/256; byte 1 ("b" after "a"): order 1 unseen, order 0 {a:1} escapes
    # with 1/2 then 1/256; byte 2 ("a" after "b"): order 1 unseen, order 0 {a:1,b:1} hits 1/4;
    # byte 3 ("b" after "a"): order 1 {b:1} hits 1/2
    assert np.exp(logp) == pytest.approx([1 / 256, 1 / 2 / 256, 1 / 4, 1 / 2])
    assert confidence == pytest.approx([0, 1 / 2, 1 / 4, 1 / 2])


def test_the_byte_mixture_does_not_sum_to_one_and_the_token_mixer_does():
    table = toy_bytes()
    tokens = np.array([0, 1, 3, 2, 1, 3, 2, 2, 1])
    p_nn = np.array([0.1, 0.3, 0.4, 0.2])  # the network's distribution at every position
    nll = -np.log(p_nn[tokens])
    cfg = ByteMixConfig(order=2, lambda_hi=0.9, lambda_lo=0.05, threshold=0.9)
    stream_scores = byte_mix_nll(tokens, nll, table, cfg)
    for p in range(1, tokens.size):
        claimed = byte_mix_distribution(tokens, p, np.log(p_nn), table, cfg)
        assert -claimed[tokens[p]] == pytest.approx(stream_scores[p], abs=1e-12)  # the score is its value
        assert abs(np.exp(claimed).sum() - 1.0) > 0.05  # ... of something that is not a distribution
        valid = mixed_distribution(tokens, p, p_nn, 2, 1.0)
        assert valid.sum() == pytest.approx(1.0, abs=1e-12)


def test_the_normalization_audit_rejects_the_byte_mixture():
    table = toy_bytes()
    tokens = np.array([0, 1, 3, 2, 1, 3, 2, 2, 1, 3])
    p_nn = np.array([0.1, 0.3, 0.4, 0.2])
    cfg = ByteMixConfig(order=2, lambda_hi=0.9, lambda_lo=0.05, threshold=0.9)
    scores = TokenScores.empty(tokens, np.ones(tokens.size, dtype=np.int32))
    scores.windows = plain_windows(tokens.size, 9)
    scores.add(np.arange(1, 10), byte_mix_nll(tokens, -np.log(p_nn[tokens]), table, cfg)[1:], scores.tick())
    scores.probes = {p: byte_mix_distribution(tokens, p, np.log(p_nn), table, cfg) for p in (3, 7)}
    result = compliance.normalization(scores)
    assert not result["passed"] and result["detail"]["max_abs_sum_error"] > 0.05
    assert result["detail"]["max_nll_mismatch"] < 1e-9  # the score is consistent; the distribution is not


def test_token_bytes_follow_the_challenge_byte_count(tmp_path):
    from pgolf.data.dataset import ensure_embedded_dataset, find_tokenizer
    from pgolf.data.shards import VAL_GLOB, list_shards, read_shard

    directory = ensure_embedded_dataset(1024)
    sp = load_tokenizer(find_tokenizer(directory, 1024))
    tokens = np.asarray(read_shard(list_shards(directory, VAL_GLOB)[0]), dtype=np.int64)[:5000]
    table = TokenBytes.from_tokenizer(sp, 1024)
    stream, start = table.stream(tokens)
    np.testing.assert_array_equal(np.diff(start), stream_bytes(tokens, build_byte_tables(sp, 1024)))
    first_doc = tokens[: np.flatnonzero(tokens == 1)[1]]
    assert bytes(stream[: start[first_doc.size]]).decode() == sp.decode(first_doc[1:].tolist())

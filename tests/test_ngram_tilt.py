"""Token-only n-gram tilt (#2130/#2135): the record's hints value for value, a normalized tilt, gate counters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pgolf import compliance
from pgolf.host import run
from pgolf.reporter import Reporter
from pgolf.scores import GateCounts
from pgolf_plugins.ngram_tilt import (
    PAIR_MIX,
    ROLLING_COEFFS,
    TARGET_DEPENDENT_CHANNELS,
    context_keys,
    ngram_predictions,
    tilted_distribution,
    tilted_nll,
    token_hints,
)
from tests.conftest import pinned_threads

# Produced by #2135's own online_ngram_tilt.py + online_ngram_state.c on the stream it holds (see its "source").
RECORD = json.loads((Path(__file__).parent / "data" / "ngram_tilt_2135.json").read_text())


def test_hints_are_the_records_position_for_position():
    hints = token_hints(np.array(RECORD["stream"]), order=16, threshold=0.8)
    assert hints.positions.tolist() == RECORD["positions"]
    assert hints.tokens.tolist() == RECORD["hints"]
    assert hints.confidence.tolist() == RECORD["confidence"]  # float32 top_count/total, bit for bit
    assert len(RECORD["positions"]) == 756  # the record's log: gated=756 token_gate=756
    assert min(RECORD["confidence"]) == pytest.approx(0.8)  # a confidence at the threshold passes, as in C


def test_tilted_nll_is_the_records():
    t = RECORD["tilt"]
    hit = np.array(t["target"]) == np.array(t["hint"])
    assert 0 < hit.sum() < hit.size
    ours = tilted_nll(np.array(t["nll"]), np.array(t["log_q"]), hit, 2.625)
    np.testing.assert_allclose(ours, t["tilted_fp64"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours, t["tilted_fp32"], rtol=0, atol=2e-6)  # the record's eval runs the fp32 variant


def reference_predictions(targets: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The record's C state, one target at a time, with dicts for its hash tables (the spec the numpy follows)."""
    ctx_len = order - 1
    ring = [int(targets[0])] if ctx_len else []  # the seeded first target
    ctx: dict[int, list[int]] = {}  # key -> [total, top_count, top_tok]
    pairs: dict[int, int] = {}
    mask = (1 << 64) - 1
    tok_out, prob_out = np.zeros(len(targets), dtype=np.int64), np.zeros(len(targets), dtype=np.float32)
    for i, tok in enumerate(int(t) for t in targets):
        if len(ring) >= ctx_len:
            key = 0
            for j, r in enumerate(ring[len(ring) - ctx_len:]):
                key ^= (r * int(ROLLING_COEFFS[j])) & mask
            if key in ctx:
                total, top, best = ctx[key]
                tok_out[i], prob_out[i] = best, np.float32(top) / np.float32(total)
            pair = ((key * int(PAIR_MIX)) & mask) ^ ((tok * int(ROLLING_COEFFS[ctx_len % 32])) & mask)
            pairs[pair] = pairs.get(pair, 0) + 1
            entry = ctx.setdefault(key, [0, 0, tok])
            entry[0] += 1
            if pairs[pair] > entry[1]:
                entry[1], entry[2] = pairs[pair], tok
        ring.append(tok)
    return tok_out, prob_out


@pytest.mark.parametrize(("vocab", "order", "seed"), [(3, 1, 0), (3, 2, 1), (4, 3, 2), (2, 6, 3), (50, 16, 4)])
def test_vectorised_counts_equal_the_sequential_state(vocab, order, seed):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, vocab, size=600)
    if vocab == 50:  # repeated phrases, so 15-token contexts recur with varied followers
        phrase = rng.integers(0, vocab, size=40)
        targets = np.tile(phrase, 15)
        targets[rng.random(targets.size) < 0.05] = 7
    tok, prob = ngram_predictions(targets, order)
    ref_tok, ref_prob = reference_predictions(targets, order)
    assert (prob > 0).sum() > 10
    np.testing.assert_array_equal(tok, ref_tok)
    np.testing.assert_array_equal(prob, ref_prob)


def test_context_keys_start_once_fifteen_tokens_are_known():
    keys, full = context_keys(np.arange(20), 15)
    assert not full[:14].any() and full[14:].all()  # the seeded first target counts as one
    assert int(keys[14]) == int(np.bitwise_xor.reduce(np.r_[0, np.arange(14)].astype(np.uint64) * ROLLING_COEFFS[:15]))


def test_hints_at_p_ignore_every_token_from_p_on():
    tokens = np.array(RECORD["stream"])
    base = token_hints(tokens, 16, 0.8)
    cut = 1500
    changed = tokens.copy()
    changed[cut:] = (changed[cut:] + 1) % 1024
    other = token_hints(changed, 16, 0.8)
    keep = base.positions <= cut
    np.testing.assert_array_equal(other.positions[other.positions <= cut], base.positions[keep])
    np.testing.assert_array_equal(other.tokens[other.positions <= cut], base.tokens[keep])


def test_the_tilted_distribution_sums_to_one_and_scores_the_target():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1024)
    logp = logits - math.log(np.exp(logits).sum())
    for hint, target in ((3, 3), (3, 9)):
        tilted = tilted_distribution(logp, hint, 2.625)
        assert np.exp(tilted).sum() == pytest.approx(1.0, abs=1e-12)
        assert -tilted[target] == pytest.approx(tilted_nll(-logp[target], logp[hint], hint == target, 2.625)[()])


def test_mixer_gates_fail_a_target_dependent_channel_that_fired():
    # #2140's logs (train_eval_seed42*.log): the first run had within/word on, the corrected one token only
    original = GateCounts({"token": 628156, "within": 9867233, "word": 2891718, "agree2plus": 303187},
                          must_stay_off=TARGET_DEPENDENT_CHANNELS)
    corrected = GateCounts({"token": 628156, "within": 0, "word": 0, "agree2plus": 0},
                           must_stay_off=TARGET_DEPENDENT_CHANNELS)
    bad = compliance.mixer_gates({"ngram_tilt": original})
    assert not bad["passed"] and bad["detail"]["fired_but_must_stay_off"]["ngram_tilt.within"] == 9867233
    assert compliance.mixer_gates({"ngram_tilt": corrected, "ppm": GateCounts({"order_1": 5})})["passed"]


def test_the_precompute_is_timed_inside_the_eval_budget_and_warmup_outside():
    parts = {"decode": 1.0, "compile_warmup": 90.0, "ngram_precompute": 200.0, "scoring": 350.0, "transforms": 1.0}
    timed = compliance.timed_eval_parts(parts)
    assert timed == ("ngram_precompute", "scoring", "transforms")
    audit = compliance.time_budget(500.0, 0.0, 0.0, False, 600.0, parts, timed, 600.0, "as-accepted")
    assert audit["passed"] and audit["detail"]["eval_timed_seconds"] == 551.0
    assert not compliance.time_budget(500.0, 0.0, 0.0, False, 600.0, parts, timed, 600.0, "strict")["passed"]


@pytest.mark.slow
def test_the_tilt_composes_with_ttt_and_passes_every_audit(micro_recipe, tmp_path):
    ttt = {"mode": "lora", "lora_rank": 8, "lora_chunk": 32, "order": "stream"}
    with pinned_threads():
        result = run(micro_recipe(techniques={"ttt": ttt, "ngram_tilt": {"order": 3, "threshold": 0.5}}), tmp_path,
                     Reporter(quiet=True))
    assert result["failed_audits"] == [], result["compliance"]
    gates = result["compliance"]["mixer_gates"]["detail"]["ngram_tilt"]["fired"]
    assert gates["token"] == result["metrics"]["ngram_tilt_hinted"] > 0
    assert all(gates[c] == 0 for c in TARGET_DEPENDENT_CHANNELS)
    assert result["metrics"]["ngram_tilt_nll_after"] != result["metrics"]["ngram_tilt_nll_before"]
    parts = result["compliance"]["time_budget"]["detail"]["eval_parts_seconds"]
    assert {"decode", "ngram_precompute", "scoring", "transforms"} <= set(parts)

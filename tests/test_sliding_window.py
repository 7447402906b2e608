"""Sliding-window evaluation: each target exactly once, with the promised context, batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.compliance import exactly_once
from pgolf.context import RunContext
from pgolf.model import GPT
from pgolf.recipe import ModelConfig, Recipe
from pgolf.registry import resolve
from pgolf.scores import EvalWindows, TokenScores, WindowScorer
from pgolf_plugins.sliding_window import SlidingWindow, sliding_windows


def early_rule_windows(num_tokens: int, seq_len: int, stride: int) -> EvalWindows:
    """PR #50's first sliding code: a window every `stride` while it reads >= 1 token, each scoring
    its last `stride` targets. Reproduced here to show the double count the later rule avoids."""
    total = num_tokens - 1
    starts = np.array([ws for ws in range(0, total, stride) if min(ws + seq_len, total) - ws >= 1], dtype=np.int64)
    lengths = np.minimum(starts + seq_len, total) - starts
    score_from = np.where(starts == 0, 0, np.maximum(lengths - stride, 0))
    return EvalWindows(starts, lengths, score_from, seq_len)


@pytest.mark.parametrize(("num_tokens", "seq_len", "stride"),
                         [(1000, 64, 8), (1000, 64, 64), (1001, 64, 16), (65, 64, 8), (30, 64, 8), (2, 64, 8),
                          (4097, 256, 64), (500, 7, 3)])
def test_every_target_is_scored_exactly_once(num_tokens, seq_len, stride):
    w = sliding_windows(num_tokens, seq_len, stride)
    cover = w.expected_coverage(num_tokens)
    assert cover[0] == 0 and (cover[1:] == 1).all()
    assert (w.lengths <= seq_len).all() and (w.starts + w.lengths <= num_tokens - 1).all()


def test_every_later_window_gives_its_targets_the_full_context():
    w = sliding_windows(10_000, 128, 32)
    later = w.starts > 0
    assert (w.score_from[later] == 128 - 32).all()  # >= 96 tokens of history before every scored target
    assert (w.lengths[:-1] == 128).all()  # only the last window may be short


def test_the_early_rule_double_counts_its_tail_and_ours_does_not():
    early = early_rule_windows(1000, 64, 8)
    cover = early.expected_coverage(1000)
    # the pitfall: the short tail windows each re-score the stream's last `stride` targets, so
    # L - stride extra scores land on them (8 targets scored 8 times for L=64, stride=8)
    assert int((cover[cover > 1] - 1).sum()) == 64 - 8
    assert int((cover > 1).sum()) == 8 and cover.max() == 8
    assert (sliding_windows(1000, 64, 8).expected_coverage(1000)[1:] == 1).all()


def tiny_model(vocab: int = 48) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def context_for(seq_len: int, batch_tokens: int) -> RunContext:
    recipe = Recipe(model=ModelConfig(vocab_size=48, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    recipe.train.seq_len = seq_len
    recipe.eval.batch_tokens = batch_tokens
    return RunContext(recipe=recipe, device=torch.device("cpu"))


def test_batched_scores_equal_one_target_at_a_time_with_the_window_context():
    model = tiny_model()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 48, size=300).astype(np.int64)
    w = sliding_windows(300, 32, 8)
    scores = TokenScores.empty(tokens, np.ones(300, dtype=np.int32))
    scores.windows = w
    WindowScorer()(model, scores, w, context_for(32, 128))
    assert exactly_once(scores)["scored_twice"] == 0 and scores.count[1:].min() == 1
    for target in (1, 17, 32, 33, 150, 299):
        start = 0 if target <= 32 else ((target - 32 - 1) // 8 + 1) * 8  # the window scoring it
        x = torch.from_numpy(tokens[start:target]).unsqueeze(0)
        y = torch.from_numpy(tokens[start + 1 : target + 1]).unsqueeze(0)
        with torch.no_grad():
            expected = float(model.token_nll(x, y)[0, -1])
        assert scores.nll[target] == pytest.approx(expected, abs=1e-5)


def test_config_validation_and_window_length_from_the_recipe():
    with pytest.raises(Exception, match="stride"):
        resolve({"sliding_window": {"stride": 0}})
    with pytest.raises(Exception, match="seq_len"):
        resolve({"sliding_window": {"stride": 64, "seq_len": 32}})
    technique = SlidingWindow(SlidingWindow.Config(stride=8))
    ctx = context_for(64, 4096)
    w = technique.pgolf_provide_eval_windows(ctx=ctx, num_tokens=500)
    assert w.seq_len == 64 and (w.expected_coverage(500)[1:] == 1).all()
    too_long = SlidingWindow(SlidingWindow.Config(stride=128))
    assert too_long.pgolf_contribute_config_errors(ctx=ctx)

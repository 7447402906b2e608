"""Evaluation windows, the per-token NLL stream, and the challenge's eval_val arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.context import RunContext
from pgolf.data.bpb import loss_and_bpb
from pgolf.model import GPT
from pgolf.recipe import ModelConfig, Recipe
from pgolf.scores import TokenScores, WindowScorer, batches, plain_windows


def test_plain_windows_follow_the_challenge_truncation():
    w = plain_windows(num_tokens=1000, seq_len=64)  # ((1000-1)//64)*64 = 960 targets
    assert len(w) == 15 and w.starts[-1] == 14 * 64
    cover = w.expected_coverage(1000)
    assert cover[0] == 0 and cover[1:961].min() == 1 and cover[961:].sum() == 0


def test_batches_group_equal_lengths_and_respect_the_token_budget():
    w = plain_windows(1000, 64)
    groups = batches(w, range(len(w)), batch_tokens=256)
    assert [len(g) for g in groups] == [4, 4, 4, 3]


def test_token_scores_totals_and_ticks():
    tokens = np.arange(10)
    scores = TokenScores.empty(tokens, np.full(10, 2))
    t = scores.tick()
    scores.add(np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]), t)
    assert scores.totals() == (6.0, 3, 6)
    assert scores.score_tick[1] == t and scores.score_tick[4] == -1
    assert scores.loss_and_bpb() == pytest.approx(loss_and_bpb(6.0, 3, 6))


def reference_eval(model: GPT, tokens: np.ndarray, byte_counts: np.ndarray, seq_len: int) -> tuple[float, float]:
    """eval_val as the challenge computes it: per-sequence mean CE times token count, in float64."""
    total = ((tokens.size - 1) // seq_len) * seq_len
    x = torch.from_numpy(tokens[:total]).reshape(-1, seq_len)
    y = torch.from_numpy(tokens[1 : total + 1]).reshape(-1, seq_len)
    loss_sum = 0.0
    with torch.no_grad():
        for i in range(x.shape[0]):
            loss_sum += float(model(x[i : i + 1], y[i : i + 1]).double()) * seq_len
    n_bytes = int(byte_counts[1 : total + 1].sum())
    return loss_and_bpb(loss_sum, total, n_bytes)


def test_window_scorer_equals_eval_val():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=1000).astype(np.int64)
    byte_counts = rng.integers(0, 4, size=1000).astype(np.int32)
    recipe = Recipe(model=cfg)
    recipe.train.seq_len = 64
    recipe.eval.batch_tokens = 192
    ctx = RunContext(recipe=recipe, device=torch.device("cpu"))
    scores = TokenScores.empty(tokens, byte_counts)
    windows = plain_windows(1000, 64)
    scores.windows = windows
    WindowScorer()(model, scores, windows, ctx)
    ours = scores.loss_and_bpb()
    theirs = reference_eval(model, tokens, byte_counts, 64)
    assert ours == pytest.approx(theirs, rel=1e-6)  # float32 batching differences only
    assert scores.count.max() == 1

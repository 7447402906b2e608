"""Score-first test-time training: schedules, bookkeeping, and proof that nothing trains unscored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pgolf import compliance
from pgolf.context import RunContext
from pgolf.errors import ConfigErrors
from pgolf.model import GPT
from pgolf.recipe import ModelConfig, Recipe
from pgolf.registry import resolve
from pgolf.scores import TokenScores, WindowScorer, plain_windows
from pgolf_plugins.sliding_window import sliding_windows
from pgolf_plugins.ttt import (
    TTT,
    ChunkedSGDScorer,
    DocumentLoRAScorer,
    LoRAAdapters,
    LoRAModel,
    TTTConfig,
    TTTStats,
    chunk_plan,
    chunk_window,
    cosine_lr,
    document_batches,
    document_spans,
    document_windows,
    global_documents,
    global_lr,
    global_tokens,
    parse_chunk_steps,
    phase_boundaries,
    phase_plan,
    score_first_chunk,
    segment_rows,
)

BOS = 1


def model_config(vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)


def random_model(vocab: int, cls: type[GPT] = GPT) -> GPT:
    torch.manual_seed(0)
    model = cls(model_config(vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def context(vocab: int, seq_len: int = 32) -> RunContext:
    recipe = Recipe(model=model_config(vocab))
    recipe.train.seq_len = seq_len
    recipe.eval.batch_tokens = 4 * seq_len
    return RunContext(recipe=recipe, device=torch.device("cpu"))


def documents(n_tokens: int, doc_lengths: list[int], vocab: int, seed: int = 0) -> np.ndarray:
    """A stream of BOS-led documents of random tokens (ids >= 2)."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for length in doc_lengths:
        out += [BOS, *rng.integers(2, vocab, size=length - 1).tolist()]
    return np.array(out[:n_tokens], dtype=np.int64)


def run(scorer, model, tokens, windows, ctx) -> TokenScores:
    """As the host's evaluate_stream: the scorer scores the windows its `windows_for` returns."""
    scores = TokenScores.empty(tokens, np.ones(tokens.shape[0], dtype=np.int32))
    windows = scorer.windows_for(windows, tokens, ctx)
    scores.windows = windows
    scorer(model, scores, windows, ctx)
    return scores


# --- schedules and window arithmetic ---------------------------------------------------------


def test_cosine_across_chunks_starts_at_lr_and_ends_at_zero():
    assert cosine_lr(0.005, 0, 10) == 0.005
    assert cosine_lr(0.005, 9, 10) == 0.0
    assert cosine_lr(0.005, 3, 7) == pytest.approx(0.0025)  # the midpoint
    assert cosine_lr(0.005, 0, 1) == 0.005


def test_chunk_window_golden_cases():
    assert chunk_window(0, 100, 32, 2048) == (0, 32, 0, 32)
    assert chunk_window(3, 100, 32, 2048) == (0, 100, 96, 4)  # the short last chunk
    assert chunk_window(5, 400, 32, 64) == (128, 64, 32, 32)  # the context reaches back 64 tokens
    # a short last chunk keeps the window start of a full one (the records would start at 116,
    # making its context depend on where the document ends)
    assert chunk_window(5, 180, 32, 64) == (128, 52, 32, 20)


def test_phase_boundaries_of_the_records():
    assert phase_boundaries(2500, 3) == [833, 1666, 2500]
    assert phase_boundaries(2000, 3) == [666, 1333, 2000]
    assert phase_boundaries(2000, 1) == [2000]


def test_documents_score_every_target_once_including_the_next_bos():
    tokens = np.array([1, 5, 6, 7, 1, 8, 9, 1, 4, 4, 4])
    starts, ends = document_spans(tokens, BOS)
    assert starts.tolist() == [0, 4, 7] and ends.tolist() == [4, 7, 10]
    cover = document_windows(starts, ends, chunks=2, context=3).expected_coverage(tokens.size)
    assert cover[0] == 0 and (cover[1:] == 1).all()
    headless = np.array([5, 6, 1, 7, 8])  # a stream that does not start with BOS
    starts, ends = document_spans(headless, BOS)
    assert starts.tolist() == [0, 2] and ends.tolist() == [2, 4]


def test_every_target_of_a_chunk_is_scored_by_that_chunk_or_earlier():
    windows = sliding_windows(5000, 256, 64)
    owner, count, last_target = chunk_plan(windows, 1024)
    assert count == 5 and last_target == 4999
    for ci in range(count):
        scored = np.concatenate([windows.target_positions(i) for i in np.flatnonzero(owner <= ci)])
        chunk = np.arange(ci * 1024 + 1, min((ci + 1) * 1024, last_target) + 1)
        assert np.isin(chunk, scored).all()


# --- chunked SGD ----------------------------------------------------------------------------


@pytest.mark.parametrize("windows_of", [lambda n: plain_windows(n, 32), lambda n: sliding_windows(n, 32, 8)])
def test_zero_learning_rate_sgd_equals_the_plain_evaluation_exactly(windows_of):
    vocab, tokens = 64, np.random.default_rng(0).integers(0, 64, size=700).astype(np.int64)
    windows = windows_of(700)
    ctx = context(vocab)
    plain = run(WindowScorer(), random_model(vocab), tokens, windows, ctx)
    model = random_model(vocab)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = TTTStats("sgd")
    adapted = run(ChunkedSGDScorer(TTTConfig(lr=0.0, chunk_tokens=128), stats), model, tokens, windows, ctx)
    np.testing.assert_array_equal(adapted.nll, plain.nll)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert stats.optimizer_steps > 0 and compliance.score_before_update(adapted, False)["passed"]


def test_sgd_scores_the_first_chunk_unadapted_then_adapts_and_never_trains_the_last_chunk():
    vocab, tokens = 64, np.tile(np.arange(2, 40), 20).astype(np.int64)
    windows = plain_windows(tokens.size, 32)
    ctx = context(vocab)
    plain = run(WindowScorer(), random_model(vocab), tokens, windows, ctx)
    cfg = TTTConfig(lr=0.05, chunk_tokens=128)
    adapted = run(ChunkedSGDScorer(cfg, TTTStats("sgd")), random_model(vocab), tokens, windows, ctx)
    np.testing.assert_array_equal(adapted.nll[1:129], plain.nll[1:129])
    _, count, last_target = chunk_plan(windows, 128)
    assert adapted.nll[129:].sum() < plain.nll[129:].sum()  # a repeated phrase is learnt
    assert max(hi for _, _, hi in adapted.updates) <= (count - 1) * 128 + 1  # last chunk: no targets trained
    assert compliance.score_before_update(adapted, True)["passed"]


@pytest.mark.parametrize("cfg", [
    TTTConfig(mode="sgd", lr=0.01, chunk_tokens=128),
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01),
], ids=["sgd", "lora"])
def test_scorers_fill_probes_at_the_hosts_positions_with_the_scored_distribution(cfg):
    vocab = 64
    tokens = documents(600, [150, 90, 200, 160], vocab)
    ctx = context(vocab)
    scorer = ChunkedSGDScorer(cfg, TTTStats(cfg.mode)) if cfg.mode == "sgd" else DocumentLoRAScorer(cfg, TTTStats(cfg.mode))
    assert scorer.audit_tokens >= 0
    scores = TokenScores.empty(tokens, np.ones(600, dtype=np.int32))
    scores.probe_at = frozenset({5, 140, 301, 570})  # the first chunk and adapted ones
    scores.windows = scorer.windows_for(plain_windows(600, 32), tokens, ctx)
    scorer(random_model(vocab), scores, scores.windows, ctx)
    assert set(scores.probes) == {5, 140, 301, 570}
    assert compliance.normalization(scores)["passed"]


# --- an instrumented model proves every optimizer step trains on scored targets only ------------


class RecordingGPT(GPT):
    """Tokens are unique per position (id = position + 2, BOS = 1), so each training row's targets
    can be located in the stream; every grad-enabled forward records them."""

    rows: list[np.ndarray]

    def forward_hidden(self, input_ids, *args):
        if torch.is_grad_enabled():
            self.rows = []
            x = input_ids.detach().cpu().numpy()
            for row in x:
                cols = np.flatnonzero(row > BOS)
                if cols.size:
                    first_input = int(row[cols[0]]) - 2 - int(cols[0])
                    valid = (row != 0).sum()
                    self.rows.append(first_input + 1 + np.arange(valid))  # target positions of the row
                else:
                    self.rows.append(np.zeros(0, dtype=np.int64))
        return super().forward_hidden(input_ids, *args)


@pytest.mark.parametrize("cfg", [
    TTTConfig(mode="sgd", lr=0.01, chunk_tokens=128),
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=3, lora_lr=0.01),
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01, phases=2, prefix_docs=4,
              chunk_tokens=64, lr=0.01, order="stream", global_seq_len=32),
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01, phases=2, prefix_docs=4,
              chunk_tokens=64, lr=0.01, global_seq_len=32, lora_short_chunks=[[100, 8]]),
], ids=["sgd", "lora", "phased", "records_order"])
def test_every_optimizer_step_trains_only_on_targets_scored_before_it(cfg):
    n = 700
    tokens = np.arange(n, dtype=np.int64) + 2
    tokens[[0, 90, 200, 260, 420, 600]] = BOS
    vocab = n + 2
    model = random_model(vocab, RecordingGPT)
    scores = TokenScores.empty(tokens, np.ones(n, dtype=np.int32))
    windows = plain_windows(n, 32)
    scores.windows = windows
    steps: list[tuple[int, list[np.ndarray]]] = []

    def check(optimizer, args, kwargs):
        trained_rows = [rows for rows, p in zip(model.rows, _rows_with_grad(optimizer, len(model.rows)), strict=True) if p]
        for rows in trained_rows:
            # the junction after the stream's last document (no trailing BOS) locates past the end; it is
            # the next document's BOS, charged to the position before it
            rows = rows[rows < n]
            if not rows.size:  # a lone trailing BOS row has no locatable target
                continue
            assert scores.count[rows].min() > 0, f"trains on unscored targets {rows[scores.count[rows] == 0][:5]}"
        steps.append((len(trained_rows), trained_rows))

    handle = register_optimizer_step_pre_hook(check)
    try:
        scorer = ChunkedSGDScorer(cfg, TTTStats(cfg.mode)) if cfg.mode == "sgd" else DocumentLoRAScorer(cfg, TTTStats(cfg.mode))
        scorer(model, scores, windows, context(vocab))
    finally:
        handle.remove()
    assert steps and sum(k for k, _ in steps) > 0
    assert compliance.score_before_update(scores, True)["passed"]
    if cfg.mode == "lora" and not cfg.phases:  # (global passes train whole scored documents)
        starts, ends = document_spans(tokens, BOS)
        for s, e in zip(starts, ends, strict=True):  # a document's last chunk is never trained by its LoRA
            last_chunk_start = s + ((e - s - 1) // 16) * 16 + 1
            assert not any(lo <= last_chunk_start < hi for _, lo, hi in scores.updates)


def _rows_with_grad(optimizer: torch.optim.Optimizer, rows: int) -> list[bool]:
    """Which batch rows the step's loss depends on: all rows for full-parameter SGD (its rows are
    all training sequences); for LoRA, rows whose adapter B received a non-zero gradient."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    batched = [p for p in params if p.dim() == 3 and p.shape[0] == rows]
    if not batched:
        return [True] * rows
    return [bool(any(p.grad[b].abs().sum() > 0 for p in batched)) for b in range(rows)]


# --- the records' document order, phases, chunk sizes and global pass ---------------------------
# Expected figures come from the records' own functions run on these synthetic lengths (a scratch
# run of `_build_ttt_global_batches`, the phase loop of `eval_val_ttt_phased` on one rank and
# `_build_cu_seqlens` from #2135's train_gpt.py, `_score_first_chunk_for_doc` from #2014's).

RECORD_DOC_LENS = np.array([5, 40, 12, 40, 7, 100, 3, 64, 12, 90, 33])  # with trailing BOS, as `_find_docs`


def test_length_order_is_the_records_queue():
    queue = document_batches(RECORD_DOC_LENS, 3, "length")
    assert [(b, d.tolist()) for b, d in queue] == [(3, [9, 5]), (2, [1, 3, 7]), (1, [2, 8, 10]), (0, [6, 0, 4])]
    assert [d.tolist() for _, d in document_batches(RECORD_DOC_LENS, 4, "stream")] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


def test_phases_overshoot_by_whole_batches_and_train_the_first_boundary_documents():
    queue = document_batches(RECORD_DOC_LENS, 3, "length")
    plan = phase_plan([len(d) for _, d in queue], phase_boundaries(7, 2))
    assert plan == [None, 3, 7, None]  # 5 documents scored at the first pass, 8 at the second
    # ordered by batch id: the longest document (5, in the first batch scored) is never trained on
    assert global_documents(queue, 1, 3).tolist() == [1, 3, 7]
    assert global_documents(queue, 2, 7).tolist() == [2, 8, 10, 1, 3, 7, 9]
    assert phase_plan([64, 64, 64], [10, 20]) == [10, 20, None]  # one pass per batch at most


def test_short_document_chunks_of_2014():
    steps = parse_chunk_steps([[2000, 24], [256, 8]])
    assert [score_first_chunk(n, steps, 48) for n in (1, 256, 257, 2000, 2001, 9000)] == [8, 8, 24, 24, 48, 48]
    assert score_first_chunk(300, [], 48) == 48


def test_records_window_of_a_short_last_chunk():
    assert chunk_window(5, 180, 32, 64, causal=False) == (116, 64, 44, 20)  # `_compute_chunk_window`
    assert chunk_window(3, 100, 32, 2048, causal=False) == (0, 100, 96, 4)


def test_global_schedule_warmup_then_cosine():
    assert [global_lr(0.001, ci, 5) for ci in (0, 2, 4)] == pytest.approx([0.001, 0.0005, 0.0])
    # GLOBAL_TTT_WARMUP_CHUNKS 2 from 0: 0, lr, then cosine over the remaining chunks
    assert [global_lr(1.0, ci, 6, 2, 0.0) for ci in range(6)] == pytest.approx(
        [0.0, 1.0, 0.5 * (1 + np.cos(np.pi * 0 / 3)), 0.75, 0.25, 0.0])


def test_segments_are_the_records_cu_seqlens():
    x = np.array([1, 5, 6, 1, 1, *[7] * 15, 1, *[8] * 9])  # BOS at 0, 3, 4, 20; `_build_cu_seqlens` max 8
    _, ys = segment_rows(x, x, BOS, 8)
    assert [int((r != -100).sum()) for r in ys] == [3, 1, 8, 8, 8, 2]  # cu 0, 3, 4, 12, 20, 28, 30
    x = np.array([*[5] * 5, 1, 1, *[9] * 13])  # the run starts inside a document: cu 0, 5, 6, 14, 20
    xs, ys = segment_rows(x, x, BOS, 8)
    assert [int((r != -100).sum()) for r in ys] == [5, 1, 8, 6] and xs[1, 0] == BOS


def test_global_tokens_are_whole_documents_with_their_trailing_bos():
    tokens = np.array([1, 5, 6, 1, 7, 1, 8, 9, 9])
    starts, ends = document_spans(tokens, BOS)
    seq, charged = global_tokens(tokens, starts, ends, np.array([2, 0]))
    assert seq.tolist() == [1, 8, 9, 9, 1, 5, 6, 1]
    # the last document has no trailing BOS; the junction BOS is charged to the token before it
    assert charged.tolist() == [5, 6, 7, 8, 8, 1, 2, 3]


def test_lora_output_is_scaled_by_alpha_over_rank_and_a_is_warm_across_batches():
    shapes = {"head": (3, 2)}
    a = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]])  # one row, rank 2
    adapters = LoRAAdapters(shapes, {"head": a}, rank=2, scale=144 / 2, device=torch.device("cpu"))
    with torch.no_grad():
        adapters.B["head"].copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))
    x = torch.tensor([[[1.0, 1.0, 1.0]]])
    # x A^T = [3, 1]; (x A^T) B^T = [3, 2]; times 144 / 2
    assert adapters.delta("head", x).tolist() == [[[216.0, 144.0]]]
    with torch.no_grad():
        adapters.A["head"].add_(1.0)  # as trained
    adapters.next_batch(warm_a=True)
    assert adapters.B["head"].abs().sum() == 0 and torch.equal(adapters.A["head"], a + 1.0)
    adapters.next_batch(warm_a=False)
    assert torch.equal(adapters.A["head"], a)


def test_lora_a_draw_is_the_records_uniform_bound():
    lora = LoRAModel(random_model(64), TTTConfig(mode="lora", lora_rank=4, lora_targets=["q", "head"]), seed=0)
    a = lora.draw_a(3, draw=0)
    assert a["head"].shape == (3, 4, 32) and a["head"].abs().max() <= 1 / np.sqrt(32)
    assert not torch.equal(a["head"][0], a["head"][1])  # every row its own draw, as BatchedLinearLoRA
    assert torch.equal(lora.draw_a(3, draw=0)["0_q"], a["0_q"]) and lora.scale == 144 / 4


# --- per-document LoRA ------------------------------------------------------------------------


def test_zero_b_adapters_score_exactly_as_the_base_model():
    vocab = 64
    model = random_model(vocab)
    lora = LoRAModel(model, TTTConfig(mode="lora", lora_rank=4), seed=0)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(3, 20)))
    with torch.no_grad(), lora.hooked(lora.new_adapters(3, torch.device("cpu"))):
        adapted = lora.logits(x)
    with torch.no_grad():
        base = model.logits(model.forward_hidden(x))
    assert torch.equal(adapted, base)


def test_zero_learning_rate_lora_equals_the_plain_document_isolated_evaluation():
    vocab = 64
    tokens = documents(600, [150, 90, 200, 160], vocab)
    ctx = context(vocab)
    cfg = TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_lr=0.0, lora_weight_decay=0.0, lora_batch_docs=2,
                    order="stream")
    adapted = run(DocumentLoRAScorer(cfg, TTTStats("lora")), random_model(vocab), tokens, plain_windows(600, 32), ctx)
    starts, ends = document_spans(tokens, BOS)
    doc_windows = document_windows(starts, ends, 16, 32)
    plain = run(WindowScorer(), random_model(vocab), tokens, doc_windows, ctx)
    # the same windows, batched differently (documents padded to a common width): float32 rounding only
    np.testing.assert_allclose(adapted.nll, plain.nll, rtol=0, atol=1e-6)
    assert (adapted.count[1:] == 1).all() and adapted.windows is not None
    # the windows it reports (the host stores them for the exactly-once audit) are the document chunks
    np.testing.assert_array_equal(adapted.windows.starts, doc_windows.starts)
    np.testing.assert_array_equal(adapted.windows.lengths, doc_windows.lengths)
    np.testing.assert_array_equal(adapted.windows.score_from, doc_windows.score_from)
    np.testing.assert_array_equal(adapted.windows.expected_coverage(600), adapted.count)


def test_lora_adapts_within_a_document_and_the_first_chunk_is_untouched():
    vocab = 64
    tokens = documents(400, [400], vocab)
    tokens[1:] = np.tile(np.arange(2, 18), 25)[:399]  # a repetitive document: adapters learn it
    ctx = context(vocab)
    base_cfg = TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_lr=0.0, lora_weight_decay=0.0)
    plain = run(DocumentLoRAScorer(base_cfg, TTTStats("lora")), random_model(vocab), tokens, plain_windows(400, 32), ctx)
    cfg = TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_lr=0.01, lora_betas=[0.9, 0.999])
    adapted = run(DocumentLoRAScorer(cfg, TTTStats("lora")), random_model(vocab), tokens, plain_windows(400, 32), ctx)
    np.testing.assert_array_equal(adapted.nll[1:17], plain.nll[1:17])
    assert adapted.nll[17:].sum() < plain.nll[17:].sum()


@pytest.mark.parametrize("cfg", [
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01, order="stream",
              lora_short_chunks=[[100, 8]]),
    TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01, phases=3, prefix_docs=9,
              chunk_tokens=64, lr=0.01, order="stream", global_seq_len=32),
], ids=["lora", "phased"])
def test_document_scores_never_depend_on_what_follows(cfg):
    """Later text may end the cut's document early and add documents (so fewer or more phases
    complete); in stream order no score at or before the cut may change. (The records' longest-first
    order fails this: the conformance variant `records_order` expects the causality audit to fail.)"""
    vocab = 64
    tokens = documents(1000, [90, 150, 60, 200, 120, 100, 180, 100], vocab)
    cut = 455  # inside the fourth document, 20 targets into a 16-target chunk grid
    other = tokens.copy()
    other[cut + 1 :] = np.random.default_rng(5).integers(2, vocab, size=tokens.size - cut - 1)
    other[[cut + 3, cut + 60, cut + 130, cut + 300]] = BOS
    ctx = context(vocab)
    windows = plain_windows(1000, 32)
    base = run(DocumentLoRAScorer(cfg, TTTStats("lora")), random_model(vocab), tokens, windows, ctx)
    changed = run(DocumentLoRAScorer(cfg, TTTStats("lora")), random_model(vocab), other, windows, ctx)
    np.testing.assert_allclose(base.nll[: cut + 1], changed.nll[: cut + 1], rtol=0, atol=1e-6)  # batch shapes differ
    assert not np.array_equal(base.nll[cut + 1 :], changed.nll[cut + 1 :])


def test_depth_recurrence_gets_one_adapter_per_virtual_layer():
    vocab = 64
    model = random_model(vocab)
    model.encoder_indices, model.decoder_indices, model.looping_active = [0, 1, 0], [1, 0, 1], True
    cfg = TTTConfig(mode="lora", lora_rank=4, lora_targets=["q", "v", "mlp"])
    lora = LoRAModel(model, cfg, seed=0)
    assert sorted(lora.shapes) == sorted(f"{s}_{t}" for s in range(6) for t in ("q", "v", "mlp"))
    x = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(2, 12)))
    adapters = lora.new_adapters(2, torch.device("cpu"))
    with torch.no_grad(), lora.hooked(adapters):
        base = lora.logits(x)
        adapters.B["2_q"].normal_()  # the third pass (block 0's second run) only
        third_pass = lora.logits(x)
        adapters.B["2_q"].zero_()
        adapters.B["0_q"].normal_()
        first_pass = lora.logits(x)
    assert not torch.equal(base, third_pass) and not torch.equal(third_pass, first_pass)



@pytest.mark.parametrize("variant", ["two_lane", "sum"])
def test_recurrence_with_untied_passes_and_parallel_lanes_keeps_one_slot_per_virtual_layer(variant):
    """The record stack's eval model: layers looped with per-pass MLPs, the decoder on parallel
    residuals. Every virtual layer is one slot; zero adapters give the model's own logits; an
    adapter on a repeated pass's MLP changes only what that pass computes."""
    from pgolf_plugins.recurrence import RecurrenceConfig, apply_recurrence, set_loop_passes

    vocab = 64
    cfg = ModelConfig(vocab_size=vocab, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1,
                      parallel_start_layer=2, parallel_variant=variant)
    torch.manual_seed(0)
    model = GPT(cfg)
    loop = RecurrenceConfig(loop_start=1, loop_end=2, num_loops=2, untie_mlp=True)
    apply_recurrence(model, loop)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    set_loop_passes(model, loop, loop.num_loops)
    model.eval()
    lora = LoRAModel(model, TTTConfig(mode="lora", lora_rank=4), seed=0)
    plan = [*model.encoder_indices, *model.decoder_indices]
    assert len(plan) == 8 and len(lora.plan) == 8
    x = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, size=(2, 12)))
    adapters = lora.new_adapters(2, torch.device("cpu"))
    untied_slot = next(s for s, i in enumerate(plan) if i >= len(model.blocks))
    with torch.no_grad():
        plain = model.logits(model.forward_hidden(x))
    with torch.no_grad(), lora.hooked(adapters):
        base = lora.logits(x)
        torch.testing.assert_close(base, plain, rtol=0, atol=0)
        adapters.B[f"{untied_slot}_mlp"].normal_()
        assert not torch.equal(lora.logits(x), base)

# --- the technique ----------------------------------------------------------------------------


def test_config_checks():
    with pytest.raises(Exception, match="lora_targets"):
        resolve({"ttt": {"lora_targets": ["q", "nope"]}})
    with pytest.raises(Exception, match="lora_context"):
        resolve({"ttt": {"lora_chunk": 64, "lora_context": 32}})
    with pytest.raises(ConfigErrors) as problems:  # every problem at once, each at its key
        resolve({"ttt": {"lora_betas": [0.9], "chunk_tokens": 0, "lr": -1.0}})
    assert sorted(e.key for e in problems.value.errors) == [
        "techniques.ttt.chunk_tokens", "techniques.ttt.lora_betas", "techniques.ttt.lr"]
    ctx = context(64, seq_len=256)
    ctx.recipe.techniques = {"ttt": {"mode": "lora"}, "sliding_window": {}}
    lora = next(e.instance for e in resolve(ctx.recipe.techniques) if e.name == "ttt")
    assert any("sliding_window" in e for e in lora.pgolf_contribute_config_errors(ctx=ctx))
    ctx.recipe.techniques = {"ttt": {"mode": "lora"}}
    assert not lora.pgolf_contribute_config_errors(ctx=ctx)
    short = TTT(TTTConfig(chunk_tokens=128))
    assert any("chunk_tokens" in e for e in short.pgolf_contribute_config_errors(ctx=ctx))


# --- two ranks (gloo on CPU) ------------------------------------------------------------------


def _rank_body(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from pgolf.context import Distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for mode in TWO_RANK_MODES:
            scores = _two_rank_case(mode, Distributed(rank=rank, world_size=world))
            if rank == 0:
                np.save(f"{out}-{mode}.npy", np.stack([scores.nll, scores.count.astype(np.float64)]))
                assert compliance.score_before_update(scores, True)["passed"]
        dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort otherwise)
    finally:
        dist.destroy_process_group()


TWO_RANK_MODES = ("sgd", "lora")


def _two_rank_case(mode: str, distributed) -> TokenScores:
    vocab = 64
    tokens = documents(900, [150, 90, 200, 160, 300], vocab)
    ctx = context(vocab)
    ctx.dist = distributed
    if mode == "sgd":
        scorer = ChunkedSGDScorer(TTTConfig(lr=0.01, chunk_tokens=128), TTTStats(mode))
    else:
        # fresh A and no phases: a warm A chains through one rank's batches, and a phase's boundary falls after
        # whole batches of every rank (the records' overshoot), so with phases the documents a global pass
        # sees depend on the ranks, as in the records
        cfg = TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_batch_docs=2, lora_lr=0.01, phases=0,
                        chunk_tokens=64, lr=0.01, order="stream", lora_warm_a=False)
        scorer = DocumentLoRAScorer(cfg, TTTStats(mode))
    scores = run(scorer, random_model(vocab), tokens, sliding_windows(900, 32, 8), ctx)
    scores.reduce()
    return scores


@pytest.mark.slow
def test_two_ranks_score_what_one_rank_scores(tmp_path):
    """Windows and documents split over two gloo ranks, gradients summed: the single-rank scores."""
    import socket

    import torch.multiprocessing as mp

    from pgolf.context import Distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "two")
    mp.spawn(_rank_body, args=(2, port, out), nprocs=2)
    for mode in TWO_RANK_MODES:
        nll, count = np.load(f"{out}-{mode}.npy")
        single = _two_rank_case(mode, Distributed())
        assert (count[1:] == 1).all()
        np.testing.assert_allclose(nll, single.nll, rtol=0, atol=1e-5)

"""Score-first test-time training: adapt on validation tokens only after they have been scored.

Two families from the records, both legal under the challenge's rule ("you are only allowed to
test-time train on validation set tokens you've already evaluated your model on"):

* ``mode: sgd`` (PR #549; #1413, #1477, #1493, #1514): the stream's targets are cut into chunks
  of 32,768; every window belongs to the chunk of its first scored target. A chunk's windows are
  scored completely with the current weights, then all parameters train on that chunk for three
  epochs of SGD (momentum 0.9, gradient clip 1.0) with a cosine learning rate across chunks; the
  last chunk is never trained (nothing is left to score).
* ``mode: lora`` (PR #77, #1530; #1787-#2135): every document is evaluated on its own, in chunks
  (48 tokens in the later records; #2014 uses 8 for documents of up to 256 tokens and 24 up to 2000)
  with up to `context` tokens of its own history. Batches of documents share one adapter pool,
  rank 96 (80 from #1855) on Q/K/V/O/MLP/head (no Q/V in #1953/#2014, no K in #2130/#2135), one
  adapter per *virtual* layer under depth recurrence, output scaled by alpha/rank (144/rank from
  #1787). A chunk is scored, then one AdamW step (beta1 0) trains the adapters on it; a document's
  last chunk is never trained. Between batches B is reset and A is kept as trained (#1787's warm
  start; `lora_warm_a: false` resets A to its draw), the optimizer starts afresh. With
  ``phases > 0`` (PR #1610, #1626) a global SGD pass trains all parameters on whole scored
  documents (each with its trailing BOS, concatenated) once the scored documents reach each phase
  boundary; a phase ends with the batch that reaches its boundary (overshoot by whole batches),
  and the pass trains on the first `boundary` of the scored documents.

Document order (``order``). The records (``length``) sort documents by length and score the batches
longest first, so the phases' global passes train on the longest documents of the whole set (about
four times the tokens of as many documents in stream order, by the records' logs); a partial batch
gets fresh adapters, a batch's chunk size follows its longest document, and a short last chunk's
window ends at the document's end. That order is legal by score-first (every target is scored
before any step trains on it) but a document's score then depends on documents that follow it in
the stream: the causality audit (Issue #1017's condition 1) fails it. ``stream`` is pgolf's causal
order: consecutive documents per batch, fixed phase boundaries, chunk sizes per document, a partial
batch in the shared pool, windows that never depend on where a document ends.

The adapted forward is the model's own forward with module hooks, so every architectural gate
is honoured. Each optimizer step records the target range it trains on with
`TokenScores.record_update`, after the tick at which those targets were scored, so the
score-before-update audit can prove legality; probe distributions are filled at
`scores.probe_at` for the normalization audit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.api import ConfigError, EvalWindows, RunContext, Technique, TokenScores, batches, rank_share, score_batch

LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")


@dataclass
class TTTConfig:
    mode: Literal["sgd", "lora"] = "sgd"
    # chunked full-parameter SGD (mode sgd, and the global passes of phased LoRA TTT): PR #1413/#1493;
    # the records' global passes (GLOBAL_TTT_*) run lr 0.001, epochs 1 with the same momentum, chunk,
    # batch and clip
    lr: float = 0.005
    momentum: float = 0.9
    epochs: int = 3
    chunk_tokens: int = 32_768
    batch_seqs: int = 32
    grad_clip: float = 1.0
    freeze_blocks: int = 0  # the first N blocks stay fixed (PR #549's code default 2; records ran 0)
    # per-document LoRA (mode lora): PR #1530, alpha and warm A from #1787
    lora_rank: int = 96
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_chunk: int = 32
    lora_short_chunks: list[list[int]] = field(default_factory=list)  # [[max_doc_len, chunk], ...]; #2014 [[256, 8], [2000, 24]]
    lora_context: int | None = None  # tokens of a document's history per window (TTT_EVAL_SEQ_LEN); None = eval.seq_len
    lora_batch_docs: int = 64
    lora_lr: float = 1e-4
    lora_lr_mult: float = 1.0  # TTT_LOCAL_LR_MULT: 0.75 in #1953/#2014, 0.80 in #2060
    lora_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    lora_weight_decay: float = 0.5
    lora_alpha: float | None = 144.0  # output scaled by alpha/rank (TTT_LORA_ALPHA, #1787 on); None = unscaled (#1530)
    lora_warm_a: bool = True  # TTT_WARM_START_A: A kept across documents, only B reset (#1787 on)
    # phased TTT (mode lora): global SGD after each phase of the first prefix_docs documents (PR #1626)
    phases: int = 0
    prefix_docs: int = 2000
    order: Literal["length", "stream"] = "length"  # the records' longest-first queue, or stream order (causal)
    global_seq_len: int | None = None  # sequence length of the global passes; None = the TTT context (eval_seq_len)
    global_doc_boundaries: bool = True  # GLOBAL_TTT_RESPECT_DOC_BOUNDARIES: attention stays inside documents
    global_warmup_chunks: int = 0  # GLOBAL_TTT_WARMUP_CHUNKS
    global_warmup_start_lr: float = 0.0  # GLOBAL_TTT_WARMUP_START_LR

    def validate(self) -> list[tuple[str, str]]:
        """Every problem as (key, message), all reported at once."""
        problems = [(name, f"{name} must be positive")
                    for name in ("chunk_tokens", "batch_seqs", "lora_rank", "lora_chunk", "lora_batch_docs")
                    if getattr(self, name) <= 0]
        problems += [(name, f"{name} must be positive")
                     for name in ("global_seq_len", "lora_alpha") if (getattr(self, name) or 1) <= 0]
        problems += [(name, f"{name} must not be negative")
                     for name in ("epochs", "phases", "prefix_docs", "freeze_blocks", "global_warmup_chunks")
                     if getattr(self, name) < 0]
        problems += [(name, f"{name} must not be negative")
                     for name in ("lr", "lora_lr", "lora_lr_mult", "lora_weight_decay", "global_warmup_start_lr")
                     if getattr(self, name) < 0]
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            problems.append(("lora_targets", f"lora_targets must be a non-empty subset of {list(LORA_TARGETS)}; "
                                             f"got {self.lora_targets}"))
        if len(self.lora_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.lora_betas):
            problems.append(("lora_betas", "lora_betas must be two numbers in [0, 1)"))
        if not all(len(step) == 2 and min(step) > 0 for step in self.lora_short_chunks):
            problems.append(("lora_short_chunks", "lora_short_chunks must be [max_doc_len, chunk] pairs of positive "
                                                  f"integers, e.g. [[256, 8], [2000, 24]]; got {self.lora_short_chunks}"))
        longest = max([self.lora_chunk, *(s[1] for s in self.lora_short_chunks if len(s) == 2)])
        if self.lora_context is not None and 0 < self.lora_chunk and self.lora_context < longest:
            problems.append(("lora_context", f"lora_context {self.lora_context} must hold at least one chunk of "
                                             f"{longest}"))
        return problems


# --- schedules and bookkeeping -------------------------------------------------------------


def cosine_lr(base: float, index: int, count: int) -> float:
    """The records' cosine across chunks: `base` at the first chunk, 0 at the last."""
    return base * 0.5 * (1.0 + math.cos(math.pi * index / max(count - 1, 1)))


def chunk_plan(windows: EvalWindows, chunk_tokens: int) -> tuple[np.ndarray, int, int]:
    """(chunk of each window, number of chunks, last target the windows score).

    Chunk ci holds targets ci*C+1 .. (ci+1)*C; a window belongs to the chunk of its first scored
    target, so every target of chunk ci is scored by the time chunk ci's windows are done.
    """
    if len(windows) == 0:
        return np.zeros(0, dtype=np.int64), 0, 0
    first = windows.starts + 1 + windows.score_from
    last_target = int((windows.starts + windows.lengths).max())
    count = -(-last_target // chunk_tokens)
    return np.minimum((first - 1) // chunk_tokens, count - 1), count, last_target


def sync_clock(scores: TokenScores) -> None:
    """Ranks that scored different numbers of batches agree on the clock before a shared update."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([scores.clock], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        scores.clock = int(t.item())


def trainable_parameters(model: nn.Module, freeze_blocks: int) -> list[nn.Parameter]:
    frozen = tuple(f"blocks.{i}." for i in range(freeze_blocks))
    return [p for name, p in model.named_parameters() if not name.startswith(frozen)]


@contextmanager
def grads_only_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Enable gradients for `params` alone; restore every flag afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@dataclass
class TTTStats:
    """What one evaluation's adaptation did (reported from the main evaluation)."""

    mode: str
    optimizer_steps: int = 0
    trained_targets: int = 0
    scored_units: int = 0  # chunks (sgd) or documents (lora)
    global_passes: int = 0
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, Any]:
        return {f"ttt_{k}": (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


# --- full-parameter SGD over scored targets -------------------------------------------------


class ScoredRangeSGD:
    """Epochs of SGD over sequences whose targets all lie in an already-scored range [lo, hi)."""

    def __init__(self, model: nn.Module, cfg: TTTConfig, seq_len: int, stats: TTTStats) -> None:
        self.model, self.cfg, self.seq_len, self.stats = model, cfg, seq_len, stats
        self.params = trainable_parameters(model, cfg.freeze_blocks)
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum)

    def train(self, scores: TokenScores, lo: int, hi: int, lr: float, ctx: RunContext) -> None:
        """Train on targets lo .. hi-1 (inputs lo-1 .. hi-2), whole sequences only, split over ranks."""
        seqs = (hi - lo) // self.seq_len
        if seqs <= 0 or self.cfg.epochs <= 0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        world, rank = ctx.dist.world_size, ctx.dist.rank
        per_step = self.cfg.batch_seqs * world
        with grads_only_for(self.model, self.params):
            self.model.train()
            for _ in range(self.cfg.epochs):
                for first in range(0, seqs, per_step):
                    count = min(per_step, seqs - first)
                    mine = range(first + (count * rank) // world, first + (count * (rank + 1)) // world)
                    tick = scores.tick()
                    if len(mine):
                        scores.record_update(lo + mine.start * self.seq_len, lo + mine.stop * self.seq_len, tick)
                    self._step(scores.tokens, lo - 1, mine, count * self.seq_len, ctx)
            self.model.eval()

    def _step(self, tokens: np.ndarray, base: int, mine: range, global_targets: int, ctx: RunContext) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if len(mine):
            offs = base + np.arange(mine.start, mine.stop)[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None, :]
            chunk = torch.from_numpy(tokens[offs]).to(ctx.device)
            with ctx.autocast():
                nll = self.model.token_nll(chunk[:, :-1], chunk[:, 1:])
            (nll.float().sum() / global_targets).backward()
        if ctx.dist.enabled:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.stats.optimizer_steps += 1
        self.stats.trained_targets += global_targets


class ChunkedSGDScorer:
    """mode sgd: score a chunk's windows, then train all parameters on that chunk (PR #549)."""

    def __init__(self, cfg: TTTConfig, stats: TTTStats) -> None:
        self.cfg, self.stats = cfg, stats
        self.audit_tokens = 4 * cfg.chunk_tokens + 1  # causality cuts land after the first update

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows:
        return windows  # scores the windows it is given, chunk by chunk

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None:
        start = time.perf_counter()
        owner, count, last_target = chunk_plan(windows, self.cfg.chunk_tokens)
        trainer = ScoredRangeSGD(model, self.cfg, ctx.recipe.train.seq_len, self.stats)
        batch_tokens = max(ctx.recipe.eval.batch_tokens // max(ctx.dist.world_size, 1), windows.seq_len)
        probes = set(scores.probe_at)
        model.eval()
        for ci in range(count):
            members = np.flatnonzero(owner == ci)
            mine = [int(members[i]) for i in rank_share(len(members), ctx)]
            tick = scores.tick()
            with torch.no_grad():  # not inference_mode: the rotary cache built here is reused in training
                for idx in batches(windows, mine, batch_tokens):
                    score_batch(model, scores, windows, idx, ctx, tick, probes)
            self.stats.scored_units += 1
            if ci < count - 1:
                lo = ci * self.cfg.chunk_tokens + 1
                hi = min((ci + 1) * self.cfg.chunk_tokens, last_target) + 1
                trainer.train(scores, lo, hi, cosine_lr(self.cfg.lr, ci, count), ctx)
        self.stats.seconds += time.perf_counter() - start


# --- per-document LoRA: document order, phase plan, chunk sizes -----------------------------


def document_spans(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each document: it predicts targets start+1 .. end, the next BOS included.

    Documents begin at every BOS (and at position 0 if the stream does not start with one), so
    together they score every target of the stream exactly once. The records' document length
    (`_find_docs`) is end - start + 1: the document with its trailing BOS.
    """
    n = int(tokens.shape[0])
    starts = np.union1d([0], np.flatnonzero(np.asarray(tokens) == bos_id))
    starts = starts[starts < n - 1].astype(np.int64)
    ends = np.append(starts[1:], n - 1).astype(np.int64)
    return starts, ends


def document_batches(doc_lens: np.ndarray, batch_docs: int, order: str) -> list[tuple[int, np.ndarray]]:
    """The scoring queue: (batch id, document indices) per batch, in the order batches are scored.

    `length` is the records' `_build_ttt_global_batches`: documents sorted by length (stable), cut
    into batches of `batch_docs`, batches scored longest first (by their longest document, ties in
    id order); the id is the batch's place in the ascending cut. `stream` cuts consecutive documents.
    """
    if order == "stream":
        return [(b, np.arange(i, min(i + batch_docs, len(doc_lens)))) for b, i in
                enumerate(range(0, len(doc_lens), batch_docs))]
    ascending = np.argsort(np.asarray(doc_lens), kind="stable")
    cut = [(b, ascending[i : i + batch_docs]) for b, i in enumerate(range(0, len(ascending), batch_docs))]
    return sorted(cut, key=lambda batch: -int(np.asarray(doc_lens)[batch[1]].max()))


def phase_boundaries(prefix_docs: int, phases: int) -> list[int]:
    """Document counts after which a global SGD pass runs (PR #1626: 2500, 3 -> 833, 1666, 2500)."""
    return [prefix_docs * (k + 1) // phases for k in range(phases)]


def phase_plan(batch_sizes: list[int], bounds: list[int]) -> list[int | None]:
    """After which queue position each global pass runs: the boundary it trains up to, else None.

    As the records' pause: a phase ends after the batch whose documents bring the scored count to
    its boundary or past it (boundaries are overshot by whole batches), one pass per batch at most.
    """
    plan: list[int | None] = []
    done, phase = 0, 0
    for size in batch_sizes:
        done += size
        if phase < len(bounds) and done >= bounds[phase]:
            plan.append(bounds[phase])
            phase += 1
        else:
            plan.append(None)
    return plan


def global_documents(queue: list[tuple[int, np.ndarray]], through: int, boundary: int) -> np.ndarray:
    """The documents a global pass trains on, in training order: every document scored in queue
    positions 0..through, ordered by (batch id, place in batch), the first `boundary` of them
    (the records' `scored_docs_for_global[:current_phase_boundary]`)."""
    scored = sorted(queue[: through + 1], key=lambda batch: batch[0])
    docs = np.concatenate([d for _, d in scored]) if scored else np.zeros(0, dtype=np.int64)
    return docs[:boundary]


def parse_chunk_steps(steps: list[list[int]]) -> list[tuple[int, int]]:
    """`[[max_doc_len, chunk], ...]` sorted by length (#2014's TTT_SHORT_SCORE_FIRST_STEPS 256:8,2000:24)."""
    return sorted((int(a), int(b)) for a, b in steps)


def score_first_chunk(doc_len: int, steps: list[tuple[int, int]], default: int) -> int:
    """Chunk size for a document of `doc_len` tokens (#2014's `_score_first_chunk_for_doc`): the
    chunk of the first step whose length limit holds it, else `default`."""
    for limit, chunk in steps:
        if doc_len <= limit:
            return chunk
    return default


def chunk_window(ci: int, pred_len: int, chunk: int, context: int, causal: bool = True) -> tuple[int, int, int, int]:
    """(window start, window length, chunk offset, chunk length) of chunk ci of a document.

    The window ends at the chunk's end. `causal` starts it where the window of a full chunk would,
    at most `context` tokens before the chunk's full end; the records (`causal=False`) start a
    document's short last chunk `context` tokens before the document's end, which gives its targets
    a context that depends on where the next BOS falls (a later token): the causality audit sees it.
    """
    count = -(-pred_len // chunk)
    end = pred_len if ci == count - 1 else (ci + 1) * chunk
    win_start = max(0, (ci + 1) * chunk - context) if causal else max(0, end - context)
    return win_start, end - win_start, ci * chunk - win_start, end - ci * chunk


@dataclass
class DocumentPlan:
    """How the LoRA scorer walks a stream: documents, the scoring queue, chunk size per document,
    the global passes, and whether windows are the causal ones."""

    starts: np.ndarray
    ends: np.ndarray
    queue: list[tuple[int, np.ndarray]]
    chunks: np.ndarray
    passes: list[int | None]
    causal: bool


def plan_documents(tokens: np.ndarray, bos_id: int, cfg: TTTConfig) -> DocumentPlan:
    """Document order, chunk sizes and phases for one stream (both orders, see the module doc)."""
    starts, ends = document_spans(tokens, bos_id)
    doc_lens = ends - starts + 1
    queue = document_batches(doc_lens, cfg.lora_batch_docs, cfg.order)
    steps = parse_chunk_steps(cfg.lora_short_chunks)
    chunks = np.full(len(starts), cfg.lora_chunk, dtype=np.int64)
    for _, docs in queue:
        if cfg.order == "length":  # the records size a batch's chunks by its longest document
            chunks[docs] = score_first_chunk(int(doc_lens[docs].max()), steps, cfg.lora_chunk)
        else:  # per document: a batch mate's length (a later document) never changes a score
            chunks[docs] = [score_first_chunk(int(n), steps, cfg.lora_chunk) for n in doc_lens[docs]]
    passes: list[int | None] = [None] * len(queue)
    if cfg.phases:
        # the records scale the prefix to the documents there are; in stream order the boundaries are
        # fixed counts, so whether a phase ends never depends on how many documents follow
        prefix = min(len(starts), cfg.prefix_docs) if cfg.order == "length" else cfg.prefix_docs
        passes = phase_plan([len(d) for _, d in queue], phase_boundaries(prefix, cfg.phases))
    return DocumentPlan(starts, ends, queue, chunks, passes, causal=cfg.order == "stream")


def document_windows(starts: np.ndarray, ends: np.ndarray, chunks: np.ndarray | int, context: int,
                     causal: bool = True) -> EvalWindows:
    """Every document chunk as an EvalWindows entry (what the LoRA scorer scores, for the audits)."""
    sizes = np.broadcast_to(np.asarray(chunks, dtype=np.int64), starts.shape)
    rows = [(int(s) + ws, wl, off)
            for s, e, c in zip(starts, ends, sizes, strict=True)
            for ci in range(-(-(int(e) - int(s)) // int(c)))
            for ws, wl, off, _ in [chunk_window(ci, int(e) - int(s), int(c), context, causal)]]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return EvalWindows(arr[:, 0], arr[:, 1], arr[:, 2], context)


# --- global SGD over whole scored documents (phased TTT) ------------------------------------


def global_lr(base: float, ci: int, count: int, warmup_chunks: int = 0, warmup_start: float = 0.0) -> float:
    """The records' global-pass schedule: linear warmup over the first chunks, then cosine to 0 at
    the last chunk (GLOBAL_TTT_WARMUP_CHUNKS 0 in every record: the plain cosine)."""
    warmup = max(0, min(warmup_chunks, count - 1))
    if ci < warmup:
        return warmup_start + (base - warmup_start) * ci / max(warmup - 1, 1)
    return base * 0.5 * (1.0 + math.cos(math.pi * max(ci - warmup, 0) / max(count - 1 - warmup, 1)))


def global_tokens(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray, docs: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, charged position) of a global pass: each document with its trailing BOS, concatenated.

    A target's charged position is the stream target it trains on. At a junction the next document's
    BOS follows the trailing BOS (the records' pair BOS -> BOS, which no validation text decides); it
    is charged to that trailing BOS, scored with its document.
    """
    pieces = [np.arange(int(starts[d]), int(ends[d]) + 1) for d in docs]
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    src = np.concatenate(pieces)
    charged = src.copy()
    firsts = np.cumsum([0, *(len(p) for p in pieces[:-1])])[1:]
    charged[firsts] = src[firsts - 1]
    return np.asarray(tokens)[src], charged


def segment_rows(x: np.ndarray, y: np.ndarray, bos_id: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat run as padded rows, one per attention segment (targets -100 on padding).

    Segments as the records' `_build_cu_seqlens`: a segment starts at the run's start and at every
    BOS, and a document is cut every `max_len` tokens from its start. Causal attention inside a row
    is the records' varlen attention inside a segment.
    """
    bos = np.flatnonzero(x == bos_id).tolist()
    heads = bos if bos and bos[0] == 0 else [0, *bos]
    cuts = [p for s, e in zip(heads, [*heads[1:], len(x)], strict=True) for p in range(s, e, max_len)]
    spans = list(zip(cuts, [*cuts[1:], len(x)], strict=True))
    width = max(e - s for s, e in spans)
    xs = np.zeros((len(spans), width), dtype=np.int64)
    ys = np.full((len(spans), width), -100, dtype=np.int64)
    for r, (s, e) in enumerate(spans):
        xs[r, : e - s], ys[r, : e - s] = x[s:e], y[s:e]
    return xs, ys


def position_runs(positions: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique positions as [lo, hi) runs (what one optimizer step trained on)."""
    p = np.unique(positions)
    if p.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(p, breaks)]


@contextmanager
def unweighted_loss(model: nn.Module) -> Iterator[None]:
    """The records' global pass trains on the plain mean loss: no per-token loss weights."""
    saved = getattr(model, "loss_weights", None)
    if saved is not None:
        model.loss_weights = None
    try:
        yield
    finally:
        if saved is not None:
            model.loss_weights = saved


def train_global(model: nn.Module, cfg: TTTConfig, scores: TokenScores, seq: np.ndarray, charged: np.ndarray,
                 seq_len: int, ctx: RunContext, stats: TTTStats) -> None:
    """One global pass (the records' `train_val_ttt_global_sgd_distributed`) over concatenated documents.

    Chunks of `chunk_tokens`, the last never trained; whole sequences of `seq_len` per chunk; SGD with
    momentum on every parameter, warmup + cosine across chunks, gradient clip; attention kept inside
    documents (`global_doc_boundaries`). The loss is the training loss (`model(x, y)`), as the records':
    AsymLogit's caps, used only in scoring, get no gradient here. A step's sequences are split over
    ranks and its gradient summed, so every world size takes the same steps.
    """
    total = int(seq.shape[0]) - 1
    count = -(-total // cfg.chunk_tokens)
    if count <= 1 or cfg.epochs <= 0:
        stats.global_passes += 1
        return
    params = trainable_parameters(model, cfg.freeze_blocks)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    world, rank = ctx.dist.world_size, ctx.dist.rank
    bos = ctx.data.bos_id if ctx.data is not None else 1
    with grads_only_for(model, params), unweighted_loss(model):
        model.train()
        for ci in range(count - 1):
            lo = ci * cfg.chunk_tokens
            seqs = (min(lo + cfg.chunk_tokens, total) - lo) // seq_len
            if seqs <= 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = global_lr(cfg.lr, ci, count, cfg.global_warmup_chunks, cfg.global_warmup_start_lr)
            for _ in range(cfg.epochs):
                for first in range(0, seqs, cfg.batch_seqs * world):
                    n = min(cfg.batch_seqs * world, seqs - first)
                    mine = range(first + (n * rank) // world, first + (n * (rank + 1)) // world)
                    a, b = lo + mine.start * seq_len, lo + mine.stop * seq_len
                    tick = scores.tick()
                    for run_lo, run_hi in position_runs(charged[a + 1 : b + 1]):
                        scores.record_update(run_lo, run_hi, tick)
                    optimizer.zero_grad(set_to_none=True)
                    if b > a:
                        x, y = seq[a:b], seq[a + 1 : b + 1]
                        if cfg.global_doc_boundaries:
                            xs, ys = segment_rows(x, y, bos, seq_len)
                        else:
                            xs, ys = x.reshape(-1, seq_len), y.reshape(-1, seq_len)
                        xt, yt = torch.from_numpy(xs).to(ctx.device), torch.from_numpy(ys).to(ctx.device)
                        with ctx.autocast():
                            loss = model(xt, yt)
                        (loss.float() * ((b - a) / (n * seq_len))).backward()
                    if ctx.dist.enabled:
                        for p in params:
                            if p.grad is None:
                                p.grad = torch.zeros_like(p)
                            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                    if cfg.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    stats.optimizer_steps += 1
                    stats.trained_targets += n * seq_len
        model.eval()
    stats.global_passes += 1


# --- per-document LoRA adapters ---------------------------------------------------------------


class LoRAAdapters(nn.Module):
    """Low-rank adapters for a batch of documents, one per row: delta(x) = scale * (x Aᵀ) Bᵀ.

    `scale` is alpha / rank (#1787 onward: 144 / rank), so the rank does not change the step size.
    B starts at zero (a document's first chunk is scored exactly as the base model).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], a_init: dict[str, Tensor], rank: int, scale: float,
                 device: torch.device) -> None:
        super().__init__()
        self.scale = scale
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for key, (_, fan_out) in shapes.items():
            a = a_init[key].to(device)
            self.A[key] = nn.Parameter(a.clone())
            self.B[key] = nn.Parameter(torch.zeros(a.shape[0], fan_out, rank, device=device))
        self.a_init = {key: a.to(device) for key, a in a_init.items()}

    def delta(self, key: str, x: Tensor) -> Tensor:
        a, b = self.A[key], self.B[key]
        out = (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype)
        return out * self.scale if self.scale != 1.0 else out

    @torch.no_grad()
    def next_batch(self, warm_a: bool) -> None:
        """Between batches: B back to zero; A kept as trained (warm start) or back to its draw."""
        for key in self.B:
            self.B[key].zero_()
            if not warm_a:
                self.A[key].copy_(self.a_init[key])


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks by virtual-plan index: the physical blocks, then depth recurrence's per-pass blocks."""
    return [*getattr(model, "blocks", []), *getattr(model, "extra_blocks", [])]


def target_module(block: nn.Module, target: str) -> nn.Module:
    """The module whose output a LoRA of `target` adds to (its input is the adapter's input).

    A recurrence pass block with its own MLP shares the looped block's attention (`shared`).
    """
    attn = getattr(block, "shared", block).attn
    return {"q": attn.c_q, "k": attn.c_k, "v": attn.c_v, "o": attn, "mlp": block.mlp}[target]


def hooked_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """Each module a LoRA target adds to, once: physical blocks own every target, per-pass blocks
    only their untied MLP (their attention is the physical block's)."""
    found = [(t, target_module(b, t)) for b in getattr(model, "blocks", []) for t in targets]
    found += [("mlp", b.mlp) for b in getattr(model, "extra_blocks", []) if "mlp" in targets]
    return found


class LoRAModel:
    """Runs the model's own forward with per-document adapters added through module hooks.

    A pre-hook on every block's attention norm advances the virtual-layer slot (every path through
    a block, one- or two-lane, tied or untied pass, runs it exactly once), so a block that runs
    several times under depth recurrence gets a separate adapter per pass, as in the records.
    """

    def __init__(self, model: nn.Module, cfg: TTTConfig, seed: int) -> None:
        for attr in ("forward_hidden", "logits", "layer_plan"):
            if not hasattr(model, attr):
                raise ConfigError(f"ttt mode lora needs the challenge GPT's {attr}(); this model has none",
                                  key="techniques.ttt.mode", hint="Use mode: sgd with this model.")
        self.model, self.cfg, self.seed = model, cfg, seed
        encoder, decoder = model.layer_plan()
        self.plan = [*encoder, *decoder]
        blocks = model_blocks(model)
        self.block_targets = [t for t in cfg.lora_targets if t != "head"]
        self.shapes: dict[str, tuple[int, int]] = {}
        for slot, index in enumerate(self.plan):
            for target in self.block_targets:
                module = target_module(blocks[index], target)
                weight = getattr(module, "weight", None)
                dim = int(model.tok_emb.embedding_dim)
                fan_in, fan_out = (weight.shape[1], weight.shape[0]) if weight is not None else (dim, dim)
                self.shapes[f"{slot}_{target}"] = (int(fan_in), int(fan_out))
        if "head" in cfg.lora_targets:
            self.shapes["head"] = (int(model.tok_emb.embedding_dim), int(model.tok_emb.num_embeddings))
        self.scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_alpha is not None else 1.0
        self.slot = -1
        self.adapters: LoRAAdapters | None = None

    def draw_a(self, batch: int, draw: int) -> dict[str, Tensor]:
        """The records' A init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per row, from a generator seeded
        by the run seed and `draw` (so a draw never depends on which rank or batch asks for it)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + draw)
        return {key: (torch.rand(batch, self.cfg.lora_rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)
                for key, (fan_in, _) in self.shapes.items()}

    def new_adapters(self, batch: int, device: torch.device, draw: int = 0) -> LoRAAdapters:
        return LoRAAdapters(self.shapes, self.draw_a(batch, draw), self.cfg.lora_rank, self.scale, device)

    @contextmanager
    def hooked(self, adapters: LoRAAdapters) -> Iterator[None]:
        handles = [block.attn_norm.register_forward_pre_hook(self._enter_block) for block in self.model.blocks]
        for target, module in hooked_modules(self.model, self.block_targets):
            handles.append(module.register_forward_hook(self._adder(target)))
        self.adapters = adapters
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.adapters = None

    def _enter_block(self, module: nn.Module, args: Any) -> None:
        self.slot += 1

    def _adder(self, target: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            assert self.adapters is not None
            return output + self.adapters.delta(f"{self.slot}_{target}", args[0])

        return hook

    def logits(self, x: Tensor) -> Tensor:
        """Adapted logits [B, T, V]; call inside `hooked`."""
        assert self.adapters is not None
        self.slot = -1
        hidden = self.model.forward_hidden(x)
        if self.slot != len(self.plan) - 1:
            raise RuntimeError(f"the forward ran {self.slot + 1} blocks but the layer plan has {len(self.plan)}")
        delta = self.adapters.delta("head", hidden) if "head" in self.adapters.A else None
        return self.model.logits(hidden, head_delta=delta)


class DocumentLoRAScorer:
    """mode lora: per-document chunks, scored then trained with that document's own adapters;
    with phases, global SGD passes over whole scored documents between batches."""

    def __init__(self, cfg: TTTConfig, stats: TTTStats) -> None:
        self.cfg, self.stats = cfg, stats
        self.audit_tokens = 4 * cfg.chunk_tokens + 1 if cfg.phases else 0  # room for a global pass

    def context(self, ctx: RunContext) -> int:
        return self.cfg.lora_context or ctx.recipe.eval_seq_len

    def global_seq_len(self, ctx: RunContext) -> int:
        return self.cfg.global_seq_len or self.context(ctx)

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows:
        """Every document chunk in its own window (the given windows are not used)."""
        plan = plan_documents(tokens, ctx.data.bos_id, self.cfg)
        return document_windows(plan.starts, plan.ends, plan.chunks, self.context(ctx), plan.causal)

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None:
        start = time.perf_counter()
        cfg = self.cfg
        plan = plan_documents(scores.tokens, ctx.data.bos_id, cfg)
        lora = LoRAModel(model, cfg, ctx.recipe.seed)
        probes = set(scores.probe_at)
        model.eval()
        # segments of the queue between global passes; each rank scores a contiguous share of a
        # segment's batches with its own adapter pool, created at the segment's start (as the records
        # rebuild theirs after every pass)
        cuts = [i + 1 for i, p in enumerate(plan.passes) if p is not None]
        edges = [0, *(c for c in cuts if c < len(plan.queue)), len(plan.queue)]
        for k in range(len(edges) - 1):
            segment = list(range(edges[k], edges[k + 1]))
            pool: LoRAAdapters | None = None
            with grads_only_for(model, []):
                for i in rank_share(len(segment), ctx):
                    qi = segment[i]
                    batch_id, docs = plan.queue[qi]
                    if cfg.order == "length" and len(docs) < cfg.lora_batch_docs:
                        adapters = lora.new_adapters(len(docs), ctx.device, draw=1_000 + qi)  # the records: fresh
                    else:
                        if pool is None:
                            pool = lora.new_adapters(cfg.lora_batch_docs, ctx.device, draw=k)
                        else:
                            pool.next_batch(cfg.lora_warm_a)
                        adapters = pool
                    self._batch(lora, adapters, scores, plan, docs, probes, ctx)
            through = edges[k + 1] - 1
            boundary = plan.passes[through]
            if boundary is not None and edges[k + 1] < len(plan.queue):  # a pass nothing follows is skipped
                sync_clock(scores)
                docs = global_documents(plan.queue, through, boundary)
                seq, charged = global_tokens(scores.tokens, plan.starts, plan.ends, docs)
                train_global(model, cfg, scores, seq, charged, self.global_seq_len(ctx), ctx, self.stats)
        self.stats.scored_units += len(plan.starts)
        self.stats.seconds += time.perf_counter() - start

    def _batch(self, lora: LoRAModel, adapters: LoRAAdapters, scores: TokenScores, plan: DocumentPlan,
               docs: np.ndarray, probes: set[int], ctx: RunContext) -> None:
        """Score a batch of documents chunk by chunk; after each chunk one AdamW step trains every
        document's adapters on that chunk (a document's last chunk is never trained)."""
        cfg, context = self.cfg, self.context(ctx)
        rows = next(iter(adapters.A.values())).shape[0]
        starts = np.zeros(rows, dtype=np.int64)
        pred = np.zeros(rows, dtype=np.int64)
        chunk = np.ones(rows, dtype=np.int64)
        starts[: len(docs)], pred[: len(docs)] = plan.starts[docs], plan.ends[docs] - plan.starts[docs]
        chunk[: len(docs)] = plan.chunks[docs]
        counts = -(-pred // chunk)  # rows without a document have none
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=cfg.lora_lr * cfg.lora_lr_mult,
                                      betas=tuple(cfg.lora_betas), eps=1e-10, weight_decay=cfg.lora_weight_decay)
        with lora.hooked(adapters):
            for ci in range(int(counts.max())):
                active = ci < counts
                trains = ci < counts - 1
                win = np.array([chunk_window(ci, int(p), int(c), context, plan.causal) if a else (0, 0, 0, 0)
                                for p, c, a in zip(pred, chunk, active, strict=True)], dtype=np.int64)
                win_start, win_len, offset, length = win.T
                width = int(win_len.max())
                first = starts + win_start
                cols = np.arange(width + 1)
                idx = np.minimum(first[:, None] + cols[None, :], scores.tokens.shape[0] - 1)
                tokens = np.where(cols[None, :] <= win_len[:, None], scores.tokens[idx], 0)
                chunk_ids = torch.from_numpy(tokens).to(ctx.device)
                x, y = chunk_ids[:, :-1], chunk_ids[:, 1:]
                tick = scores.tick()
                with torch.set_grad_enabled(bool(trains.any())), ctx.autocast():
                    logits = lora.logits(x)
                    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                          reduction="none").reshape(y.shape)
                j = cols[None, :width]
                mask = active[:, None] & (j >= offset[:, None]) & (j < (offset + length)[:, None])
                targets = first[:, None] + 1 + j
                scores.add(targets[mask], nll.detach().float().cpu().numpy()[mask].astype(np.float64), tick)
                for p in probes.intersection(targets[mask].tolist()):
                    b, col = np.argwhere((targets == p) & mask)[0]
                    scores.probes[int(p)] = torch.log_softmax(logits[b, col].detach().float(), -1).double().cpu().numpy()
                if not trains.any():
                    continue
                # a trained chunk is full: its window is the full chunk's, its loss the chunk's mean
                full = np.array([chunk_window(ci, (ci + 1) * int(c), int(c), context, plan.causal)[2] for c in chunk])
                train_mask = trains[:, None] & (j >= full[:, None]) & (j < (full + chunk)[:, None])
                weight = torch.from_numpy(train_mask / chunk[:, None]).to(nll.device, nll.dtype)
                tick = scores.tick()
                for s, c in zip(starts[trains], chunk[trains], strict=True):
                    scores.record_update(int(s) + ci * int(c) + 1, int(s) + (ci + 1) * int(c) + 1, tick)
                optimizer.zero_grad(set_to_none=True)
                (nll * weight).sum().backward()
                optimizer.step()
                self.stats.optimizer_steps += 1
                self.stats.trained_targets += int(chunk[trains].sum())


# --- the technique ------------------------------------------------------------------------


class TTT(Technique):
    name = "ttt"
    summary = ("Legal score-first test-time training: chunked full-parameter SGD, or per-document LoRA with "
               "phased global SGD")
    Config = TTTConfig
    stage = "eval"
    follows = ("PR #549/#1413/#1493 (chunked SGD, -0.002 bpb); PR #77/#1530 (document LoRA); "
               "PR #1610/#1626 (phased); #1787/#1868 (alpha, warm A); #1953/#2014/#2135 (masks, local LR, "
               "short-document chunks)")

    def _stats(self, ctx: RunContext) -> TTTStats:
        """Stats of this evaluation; the first one is the main evaluation, later ones are audits."""
        runs = ctx.stash.setdefault(self.name, [])
        runs.append(TTTStats(self.config.mode))
        return runs[-1]

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        cfg, errors = self.config, []
        context = cfg.lora_context or ctx.recipe.eval_seq_len
        seq_len = ctx.recipe.train.seq_len if cfg.mode == "sgd" else (cfg.global_seq_len or context)
        if cfg.mode == "lora" and "sliding_window" in ctx.recipe.techniques:
            errors.append("ttt mode lora scores every document chunk in its own window (ttt.lora_context), so "
                          "sliding_window would have no effect; remove sliding_window or use ttt mode sgd.")
        if (cfg.mode == "sgd" or cfg.phases) and cfg.chunk_tokens < seq_len:
            errors.append(f"ttt.chunk_tokens {cfg.chunk_tokens} is shorter than one training sequence "
                          f"({seq_len} tokens), so no chunk would ever be trained; raise ttt.chunk_tokens"
                          + ("." if cfg.mode == "sgd" else " or lower ttt.global_seq_len."))
        longest = max([cfg.lora_chunk, *(s[1] for s in cfg.lora_short_chunks)])
        if cfg.mode == "lora" and context < longest:
            errors.append(f"ttt.lora_chunk {longest} exceeds the window length; lower ttt.lora_chunk or "
                          "raise ttt.lora_context.")
        return errors

    def pgolf_provide_scorer(self, ctx: RunContext) -> ChunkedSGDScorer | DocumentLoRAScorer:
        stats = self._stats(ctx)
        if self.config.mode == "sgd":
            return ChunkedSGDScorer(self.config, stats)
        return DocumentLoRAScorer(self.config, stats)

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        runs = [r for r in ctx.stash.get(self.name, []) if r.scored_units]
        return runs[0].as_metrics() if runs else {}

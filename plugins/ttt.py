"""Score-first test-time training: adapt on validation tokens only after they have been scored.

Two families from the records, both legal under the challenge's rule ("you are only allowed to
test-time train on validation set tokens you've already evaluated your model on"):

* ``mode: sgd`` (PR #549; #1413, #1477, #1493, #1514): the stream's targets are cut into chunks
  of 32,768; every window belongs to the chunk of its first scored target. A chunk's windows are
  scored completely with the current weights, then all parameters train on that chunk for three
  epochs of SGD (momentum 0.9, gradient clip 1.0) with a cosine learning rate across chunks; the
  last chunk is never trained (nothing is left to score).
* ``mode: lora`` (PR #77, #1530): every document is evaluated on its own, in chunks of 32 targets
  with up to `context` tokens of its own history; each document has its own rank-96 LoRA on
  Q/K/V/O/MLP/head (one adapter per *virtual* layer under depth recurrence). A chunk is scored,
  then one AdamW step trains the adapters on it; a document's last chunk is never trained, and
  adapters and optimizer state are reset for every batch of documents. With ``phases > 0``
  (PR #1610, #1626) the first `prefix_docs` documents are split into phases; after each phase is
  scored, all parameters take a global SGD pass (the sgd settings) over the documents scored so far.

The adapted forward is the model's own forward with module hooks, so every architectural gate
is honoured. Each optimizer step records the target range it trains on with
`TokenScores.record_update`, after the tick at which those targets were scored, so the
score-before-update audit can prove legality; probe distributions are filled at
`scores.probe_at` for the normalization audit. pgolf forms phases from documents in stream
order (the records take the longest documents first), so a document's score never depends on
text that follows it and the causality audit holds too.
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
    # chunked full-parameter SGD (mode sgd, and the global passes of phased LoRA TTT): PR #1413/#1493
    lr: float = 0.005
    momentum: float = 0.9
    epochs: int = 3
    chunk_tokens: int = 32_768
    batch_seqs: int = 32
    grad_clip: float = 1.0
    freeze_blocks: int = 0  # the first N blocks stay fixed (PR #549's code default 2; records ran 0)
    # per-document LoRA (mode lora): PR #1530
    lora_rank: int = 96
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_chunk: int = 32
    lora_context: int | None = None  # tokens of a document's history per window; None = eval.seq_len
    lora_batch_docs: int = 64
    lora_lr: float = 1e-4
    lora_betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    lora_weight_decay: float = 0.5
    # phased TTT (mode lora): global SGD after each phase of the first prefix_docs documents (PR #1626)
    phases: int = 0
    prefix_docs: int = 2000

    def validate(self) -> list[tuple[str, str]]:
        """Every problem as (key, message), all reported at once."""
        problems = [(name, f"{name} must be positive")
                    for name in ("chunk_tokens", "batch_seqs", "lora_rank", "lora_chunk", "lora_batch_docs")
                    if getattr(self, name) <= 0]
        problems += [(name, f"{name} must not be negative")
                     for name in ("epochs", "phases", "prefix_docs", "freeze_blocks") if getattr(self, name) < 0]
        problems += [(name, f"{name} must not be negative")
                     for name in ("lr", "lora_lr", "lora_weight_decay") if getattr(self, name) < 0]
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            problems.append(("lora_targets", f"lora_targets must be a non-empty subset of {list(LORA_TARGETS)}; "
                                             f"got {self.lora_targets}"))
        if len(self.lora_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.lora_betas):
            problems.append(("lora_betas", "lora_betas must be two numbers in [0, 1)"))
        if self.lora_context is not None and 0 < self.lora_chunk and self.lora_context < self.lora_chunk:
            problems.append(("lora_context", f"lora_context {self.lora_context} must hold at least one chunk of "
                                             f"{self.lora_chunk}"))
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


def phase_boundaries(prefix_docs: int, phases: int) -> list[int]:
    """Document counts after which a global SGD pass runs (PR #1626: 2500, 3 -> 833, 1666, 2500)."""
    return [prefix_docs * (k + 1) // phases for k in range(phases)]


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


def train_scored_range(model: nn.Module, cfg: TTTConfig, scores: TokenScores, lo: int, hi: int, seq_len: int,
                       ctx: RunContext, stats: TTTStats) -> None:
    """One global pass (phased TTT): chunks of the scored range, cosine across them, last chunk skipped."""
    trainer = ScoredRangeSGD(model, cfg, seq_len, stats)
    count = -(-(hi - lo) // cfg.chunk_tokens)
    for ci in range(count - 1):
        start = lo + ci * cfg.chunk_tokens
        trainer.train(scores, start, min(start + cfg.chunk_tokens, hi), cosine_lr(cfg.lr, ci, count), ctx)
    stats.global_passes += 1


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


# --- per-document LoRA --------------------------------------------------------------------


def document_spans(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) of each document: it predicts targets start+1 .. end, the next BOS included.

    Documents begin at every BOS (and at position 0 if the stream does not start with one), so
    together they score every target of the stream exactly once.
    """
    n = int(tokens.shape[0])
    starts = np.union1d([0], np.flatnonzero(np.asarray(tokens) == bos_id))
    starts = starts[starts < n - 1].astype(np.int64)
    ends = np.append(starts[1:], n - 1).astype(np.int64)
    return starts, ends


def chunk_window(ci: int, pred_len: int, chunk: int, context: int) -> tuple[int, int, int, int]:
    """(window start, window length, chunk offset, chunk length) of chunk ci of a document.

    The window ends at the chunk's end and starts where the window of a full chunk would, at most
    `context` tokens before the chunk's full end. The records start a document's short last chunk
    `context` tokens before the document's end instead; that gives its targets a context that
    depends on where the next BOS falls (a later token), which the causality audit catches.
    """
    count = -(-pred_len // chunk)
    end = pred_len if ci == count - 1 else (ci + 1) * chunk
    win_start = max(0, (ci + 1) * chunk - context)
    return win_start, end - win_start, ci * chunk - win_start, end - ci * chunk


class LoRAAdapters(nn.Module):
    """Per-document low-rank adapters for one batch: delta(x) = (x Aᵀ) Bᵀ per batch row.

    B starts at zero (the first chunk is scored exactly as the base model); A starts from one
    seeded draw shared by every document, so a document's adapters never depend on which
    documents share its batch.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], init: dict[str, Tensor], batch: int, rank: int,
                 device: torch.device) -> None:
        super().__init__()
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for key, (fan_in, fan_out) in shapes.items():
            self.A[key] = nn.Parameter(init[key].to(device).expand(batch, rank, fan_in).clone())
            self.B[key] = nn.Parameter(torch.zeros(batch, fan_out, rank, device=device))

    def delta(self, key: str, x: Tensor) -> Tensor:
        a, b = self.A[key], self.B[key]
        return (x @ a.transpose(1, 2).to(x.dtype)) @ b.transpose(1, 2).to(x.dtype)


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
        self.model, self.cfg = model, cfg
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
        generator = torch.Generator().manual_seed(seed)
        self.init = {key: (torch.rand(cfg.lora_rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)
                     for key, (fan_in, _) in self.shapes.items()}
        self.slot = -1
        self.adapters: LoRAAdapters | None = None

    def new_adapters(self, batch: int, device: torch.device) -> LoRAAdapters:
        return LoRAAdapters(self.shapes, self.init, batch, self.cfg.lora_rank, device)

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
    """mode lora: per-document chunks, scored then trained with that document's own adapters."""

    def __init__(self, cfg: TTTConfig, stats: TTTStats) -> None:
        self.cfg, self.stats = cfg, stats
        self.audit_tokens = 4 * cfg.chunk_tokens + 1 if cfg.phases else 0  # room for a global pass

    def context(self, ctx: RunContext) -> int:
        return self.cfg.lora_context or ctx.recipe.eval_seq_len

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows:
        """Every document chunk in its own window (the given windows are not used)."""
        starts, ends = document_spans(tokens, ctx.data.bos_id)
        return document_windows(starts, ends, self.cfg.lora_chunk, self.context(ctx))

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None:
        start = time.perf_counter()
        cfg = self.cfg
        context = self.context(ctx)
        starts, ends = document_spans(scores.tokens, ctx.data.bos_id)
        lora = LoRAModel(model, cfg, ctx.recipe.seed)
        probes = set(scores.probe_at)
        # boundaries are fixed document counts: whether a phase ends never depends on how many
        # documents follow (a stream with fewer documents simply never reaches it)
        bounds = phase_boundaries(cfg.prefix_docs, cfg.phases) if cfg.phases else []
        edges = [0, *(min(b, len(starts)) for b in bounds), len(starts)]
        model.eval()
        for k in range(len(edges) - 1):
            docs = np.arange(edges[k], edges[k + 1])
            chunks = -(-(ends[docs] - starts[docs]) // cfg.lora_chunk)
            docs = docs[np.argsort(chunks, kind="stable")]
            groups = [docs[i : i + cfg.lora_batch_docs] for i in range(0, len(docs), cfg.lora_batch_docs)]
            with grads_only_for(model, []):
                for g in rank_share(len(groups), ctx):
                    self._batch(lora, scores, starts[groups[g]], ends[groups[g]], context, probes, ctx)
            if k < len(bounds) and 0 < edges[k + 1] < len(starts):
                sync_clock(scores)
                train_scored_range(model, cfg, scores, int(starts[0]) + 1, int(ends[edges[k + 1] - 1]) + 1,
                                   ctx.recipe.train.seq_len, ctx, self.stats)
        self.stats.scored_units += len(starts)
        self.stats.seconds += time.perf_counter() - start

    def _batch(self, lora: LoRAModel, scores: TokenScores, starts: np.ndarray, ends: np.ndarray, context: int,
               probes: set[int], ctx: RunContext) -> None:
        cfg = self.cfg
        pred = ends - starts
        counts = -(-pred // cfg.lora_chunk)
        adapters = lora.new_adapters(len(starts), ctx.device)
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=cfg.lora_lr, betas=tuple(cfg.lora_betas), eps=1e-10,
                                      weight_decay=cfg.lora_weight_decay)
        with lora.hooked(adapters):
            for ci in range(int(counts.max())):
                active = ci < counts
                trains = ci < counts - 1
                plan = np.array([chunk_window(ci, int(p), cfg.lora_chunk, context) if a else (0, 0, 0, 0)
                                 for p, a in zip(pred, active, strict=True)], dtype=np.int64)
                win_start, win_len, offset, length = plan.T
                width = int(win_len.max())
                first = starts + win_start
                cols = np.arange(width + 1)
                idx = np.minimum(first[:, None] + cols[None, :], scores.tokens.shape[0] - 1)
                chunk = torch.from_numpy(np.where(cols[None, :] <= win_len[:, None], scores.tokens[idx], 0)).to(ctx.device)
                x, y = chunk[:, :-1], chunk[:, 1:]
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
                if trains.any():
                    full_offset = chunk_window(ci, (ci + 1) * cfg.lora_chunk, cfg.lora_chunk, context)[2]
                    per_doc = nll[:, full_offset : full_offset + cfg.lora_chunk].mean(dim=-1)
                    tick = scores.tick()
                    for s in starts[trains]:
                        scores.record_update(int(s) + ci * cfg.lora_chunk + 1, int(s) + (ci + 1) * cfg.lora_chunk + 1, tick)
                    optimizer.zero_grad(set_to_none=True)
                    (per_doc * torch.from_numpy(trains).to(per_doc.device, per_doc.dtype)).sum().backward()
                    optimizer.step()
                    self.stats.optimizer_steps += 1
                    self.stats.trained_targets += int(trains.sum()) * cfg.lora_chunk


def document_windows(starts: np.ndarray, ends: np.ndarray, chunk: int, context: int) -> EvalWindows:
    """Every document chunk as an EvalWindows entry (what the LoRA scorer scores, for the audits)."""
    rows = [(int(s) + ws, wl, off)
            for s, e in zip(starts, ends, strict=True)
            for ci in range(-(-(int(e) - int(s)) // chunk))
            for ws, wl, off, _ in [chunk_window(ci, int(e) - int(s), chunk, context)]]
    arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return EvalWindows(arr[:, 0], arr[:, 1], arr[:, 2], context)


# --- the technique ------------------------------------------------------------------------


class TTT(Technique):
    name = "ttt"
    summary = "Legal score-first test-time training: chunked full-parameter SGD or per-document LoRA."
    Config = TTTConfig
    stage = "eval"
    follows = ("PR #549/#1413/#1493 (chunked SGD, -0.002 bpb); PR #77/#1530 (document LoRA); "
              "PR #1610/#1626 (phased)")

    def _stats(self, ctx: RunContext) -> TTTStats:
        """Stats of this evaluation; the first one is the main evaluation, later ones are audits."""
        runs = ctx.stash.setdefault(self.name, [])
        runs.append(TTTStats(self.config.mode))
        return runs[-1]

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        cfg, errors = self.config, []
        seq_len = ctx.recipe.train.seq_len
        if cfg.mode == "lora" and "sliding_window" in ctx.recipe.techniques:
            errors.append("ttt mode lora scores every document chunk in its own window (ttt.lora_context), so "
                          "sliding_window would have no effect; remove sliding_window or use ttt mode sgd.")
        if (cfg.mode == "sgd" or cfg.phases) and cfg.chunk_tokens < seq_len:
            errors.append(f"ttt.chunk_tokens {cfg.chunk_tokens} is shorter than one training sequence "
                          f"({seq_len} tokens), so no chunk would ever be trained; raise ttt.chunk_tokens.")
        if cfg.mode == "lora" and (cfg.lora_context or ctx.recipe.eval_seq_len) < cfg.lora_chunk:
            errors.append(f"ttt.lora_chunk {cfg.lora_chunk} exceeds the window length; lower ttt.lora_chunk or "
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

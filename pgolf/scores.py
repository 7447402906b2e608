"""Scoring types: windows over the validation stream, the per-token NLL stream, and scorers.

These are the objects the eval hooks pass (`pgolf_provide_eval_windows`, `pgolf_provide_scorer`,
`pgolf_on_scores`). The default follows the challenge's eval_val: the stream is truncated to
``((N-1)//L)*L + 1`` tokens and cut into non-overlapping windows of L tokens; every target is
scored once with the frozen model; NLL is summed in float64 and divided by ln 2 and by the
bytes those targets cover. Scoring produces a `TokenScores` stream (one NLL per position) that
eval-stage techniques transform (PPM) or produce themselves (TTT), and that the audits inspect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pgolf.context import RunContext
from pgolf.data.bpb import loss_and_bpb


@dataclass
class EvalWindows:
    """Window w reads inputs tokens[s : s+n] and scores targets s+1+j for j in [score_from, n)."""

    starts: np.ndarray
    lengths: np.ndarray
    score_from: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def target_positions(self, idx: int) -> np.ndarray:
        s, n, f = int(self.starts[idx]), int(self.lengths[idx]), int(self.score_from[idx])
        return np.arange(s + 1 + f, s + 1 + n, dtype=np.int64)

    def expected_coverage(self, num_tokens: int) -> np.ndarray:
        """How often each position is scored by these windows (the audit wants exactly once)."""
        cover = np.zeros(num_tokens, dtype=np.int32)
        for i in range(len(self)):
            cover[self.target_positions(i)] += 1
        return cover


def plain_windows(num_tokens: int, seq_len: int) -> EvalWindows:
    """The challenge's non-overlapping windows over the truncated stream."""
    total = max((num_tokens - 1) // seq_len, 0)
    starts = np.arange(total, dtype=np.int64) * seq_len
    return EvalWindows(starts, np.full(total, seq_len, dtype=np.int64), np.zeros(total, dtype=np.int64), seq_len)


@dataclass
class GateCounts:
    """How often each channel of an eval-time mixer fired over the scored stream; a channel named in
    `must_stay_off` is one the challenge ruled invalid (it reads the target), so any count there fails
    the mixer-gates audit."""

    fired: dict[str, int]
    must_stay_off: tuple[str, ...] = ()


@dataclass
class TokenScores:
    """Per-position NLL of the validation stream, with the bookkeeping the audits need.

    ``score_tick[p]`` is the logical time at which position p was scored; every adaptation
    step records the ranges of target positions it trained on and its own tick, so the
    score-before-update audit can prove each one was scored earlier. ``probes`` holds full
    log-distributions at a few audited positions.
    """

    tokens: np.ndarray
    bytes: np.ndarray
    nll: np.ndarray
    count: np.ndarray
    score_tick: np.ndarray
    probes: dict[int, np.ndarray] = field(default_factory=dict)
    updates: list[tuple[int, int, int]] = field(default_factory=list)  # (tick, lo, hi) target ranges
    clock: int = 0
    windows: EvalWindows | None = None  # set by the host: the windows the scorer actually scored
    probe_at: frozenset[int] = frozenset()  # set by the host: where scorers fill `probes`
    gates: dict[str, GateCounts] = field(default_factory=dict)  # per mixer: its channels' firing counts
    # eval sub-stages measured inside scoring or the transforms (an n-gram precompute, a compile warmup):
    # the host reports each as its own part of the evaluation time, net of the part it ran in
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls, tokens: np.ndarray, byte_counts: np.ndarray) -> TokenScores:
        n = tokens.shape[0]
        return cls(tokens, byte_counts, np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int32),
                   np.full(n, -1, dtype=np.int64))

    def tick(self) -> int:
        """A new logical time; scoring and each adaptation step each take one."""
        self.clock += 1
        return self.clock

    def add(self, positions: np.ndarray, nll: np.ndarray, tick: int) -> None:
        self.nll[positions] += nll
        self.count[positions] += 1
        self.score_tick[positions] = tick

    def record_update(self, lo: int, hi: int, tick: int) -> None:
        """An adaptation step trained on targets [lo, hi) at `tick` (call before stepping)."""
        self.updates.append((tick, lo, hi))

    @property
    def scored(self) -> np.ndarray:
        return self.count > 0

    def totals(self) -> tuple[float, int, int]:
        mask = self.scored
        return float(self.nll[mask].sum(dtype=np.float64)), int(mask.sum()), int(self.bytes[mask].sum(dtype=np.int64))

    def loss_and_bpb(self) -> tuple[float, float]:
        return loss_and_bpb(*self.totals())

    def reduce(self) -> None:
        """Combine the ranks' disjoint shares (DDP) so every rank holds the whole stream."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for arr, op in ((self.nll, dist.ReduceOp.SUM), (self.count, dist.ReduceOp.SUM), (self.score_tick, dist.ReduceOp.MAX)):
            t = torch.from_numpy(arr)
            if device is None:
                dist.all_reduce(t, op=op)  # in place on the numpy buffer
            else:  # NCCL reduces device tensors only
                on_device = t.to(device)
                dist.all_reduce(on_device, op=op)
                arr[...] = on_device.cpu().numpy()
        gathered: list[object] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self.probes, self.updates))
        self.probes, self.updates = {}, []
        for probes, updates in gathered:  # type: ignore[misc]
            self.probes.update(probes)
            self.updates.extend(updates)


class Scorer(Protocol):
    """Turns a model and windows over a token stream into TokenScores.

    A scorer's duties, which the validity audits check on every run:
    - score each target of `windows` exactly once, through `TokenScores.add` at a tick taken
      with `TokenScores.tick()` (several windows may share a tick);
    - fill ``scores.probes[p]`` with the full log-distribution at every position p of
      ``scores.probe_at`` that it scores (the normalization audit);
    - before every adaptation step, call ``scores.record_update(lo, hi, tick)`` with the target
      range it trains on and a fresh tick, after those targets were scored (score before update);
    - score only this rank's share under DDP (`rank_share`); the host reduces the ranks' scores;
    - set ``audit_tokens`` to the stream length a causality audit needs to exercise it (a TTT
      scorer needs several chunks), and give `windows_for` the windows it really scores when
      they differ from the ones it is given (document-wise scoring).
    """

    audit_tokens: int

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows: ...

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None: ...


def rank_share(n: int, ctx: RunContext) -> range:
    """Contiguous split of n items over ranks, as eval_val splits sequences."""
    r, w = ctx.dist.rank, ctx.dist.world_size
    return range((n * r) // w, (n * (r + 1)) // w)


def batches(windows: EvalWindows, indices: range | list[int], batch_tokens: int) -> list[list[int]]:
    """Group window indices into batches of equal length and at most `batch_tokens` inputs."""
    out: list[list[int]] = []
    current: list[int] = []
    for i in indices:
        n = int(windows.lengths[i])
        if current and (int(windows.lengths[current[0]]) != n or (len(current) + 1) * n > batch_tokens):
            out.append(current)
            current = []
        current.append(i)
    if current:
        out.append(current)
    return out


def score_batch(model: nn.Module, scores: TokenScores, windows: EvalWindows, idx: list[int], ctx: RunContext,
                tick: int, probes: set[int], grad: bool = False) -> torch.Tensor | None:
    """Score one batch of equal-length windows into `scores`; return the per-window NLL if `grad`."""
    n = int(windows.lengths[idx[0]])
    starts = windows.starts[idx]
    offs = starts[:, None] + np.arange(n + 1)[None, :]
    chunk = torch.from_numpy(scores.tokens[offs]).to(ctx.device)
    x, y = chunk[:, :-1], chunk[:, 1:]
    first = windows.score_from[idx]
    targets = starts[:, None] + 1 + np.arange(n)[None, :]
    mask = np.arange(n)[None, :] >= first[:, None]
    wanted = [p for p in probes if ((targets == p) & mask).any()] if probes else []
    with torch.set_grad_enabled(grad), ctx.autocast():
        if wanted:
            logp = model.log_probs(x)
            nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            for p in wanted:
                b, j = np.argwhere((targets == p) & mask)[0]
                scores.probes[int(p)] = logp[b, j].detach().double().cpu().numpy()
        else:
            nll = model.token_nll(x, y)
    flat = nll.detach().float().cpu().numpy()
    scores.add(targets[mask], flat[mask].astype(np.float64), tick)
    return nll if grad else None


class WindowScorer:
    """Host default: score every window once with the frozen model (eval_val)."""

    audit_tokens = 0

    def windows_for(self, windows: EvalWindows, tokens: np.ndarray, ctx: RunContext) -> EvalWindows:
        return windows

    def __call__(self, model: nn.Module, scores: TokenScores, windows: EvalWindows, ctx: RunContext) -> None:
        model.eval()
        tick = scores.tick()
        batch_tokens = max(ctx.recipe.eval.batch_tokens // max(ctx.dist.world_size, 1), windows.seq_len)
        probes = set(scores.probe_at)
        with torch.inference_mode():
            for idx in batches(windows, rank_share(len(windows), ctx), batch_tokens):
                score_batch(model, scores, windows, idx, ctx, tick, probes)


def limit_tokens(tokens: np.ndarray, byte_counts: np.ndarray, max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    if max_tokens is None or max_tokens >= tokens.shape[0]:
        return tokens, byte_counts
    return tokens[:max_tokens], byte_counts[:max_tokens]


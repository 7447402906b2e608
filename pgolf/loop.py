"""The training loop of the challenge's train_gpt.py, with the host's hooks at its seams.

Warmup steps prime every graph (and each warmup phase a technique contributes), then the
initial weights and optimizer state are restored so timed training starts from the true init.
The loop stops at `iterations` or at the wallclock cap minus any reserve techniques declared;
the warmdown multiplier is keyed to elapsed time when capped, exactly as the baseline.
"""

from __future__ import annotations

import copy
import ctypes
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pgolf.context import RunContext, WarmupPhase
from pgolf.data.dataset import Dataset, DistributedTokenLoader
from pgolf.errors import ConfigError, TrainingError
from pgolf.optim import Muon, muon_momentum_at, muon_weight_decay_at
from pgolf.recipe import TrainConfig

ModelHook = Callable[[nn.Module], None]


@dataclass
class LoopHooks:
    """The host's hook calls at the loop's seams (the loop itself never calls hooks)."""

    warmup_phases: Callable[[nn.Module], list[WarmupPhase]]
    train_start: ModelHook
    step_start: ModelHook
    step_end: ModelHook


@dataclass
class TrainResult:
    steps: int
    train_seconds: float
    stopped_early: bool
    final_train_loss: float
    tokens_seen: int
    wallclock_cap_seconds: float | None
    reserve_seconds: float
    warmup_seconds: float

    @property
    def step_avg_ms(self) -> float:
        return 1000.0 * self.train_seconds / max(self.steps, 1)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    if cfg.grad_accum_steps is not None:
        if cfg.grad_accum_steps <= 0:
            raise ConfigError("train.grad_accum_steps must be positive", key="train.grad_accum_steps")
        return cfg.grad_accum_steps
    if 8 % world_size:
        raise ConfigError(f"world size {world_size} does not divide 8, so the challenge's grad_accum_steps = 8 // world_size "
                          "is not integral", key="train.grad_accum_steps", hint="Set train.grad_accum_steps explicitly.")
    return 8 // world_size


def check_batch(cfg: TrainConfig, world_size: int, accum: int) -> None:
    per_micro = cfg.batch_tokens // (world_size * accum)
    if cfg.batch_tokens % (world_size * accum) or per_micro % cfg.seq_len:
        raise ConfigError(
            f"train.batch_tokens {cfg.batch_tokens} does not split into whole sequences of {cfg.seq_len} over "
            f"{world_size} rank(s) x {accum} accumulation step(s)",
            key="train.batch_tokens",
            hint=f"Use a multiple of {cfg.seq_len * world_size * accum}.",
        )


def lr_multiplier(step: int, elapsed_s: float, cfg: TrainConfig, cap_s: float | None) -> float:
    """The warmdown multiplier: keyed to wallclock when capped, to steps otherwise."""
    if cfg.warmdown_frac is not None:
        progress = min(elapsed_s / cap_s, 1.0) if cap_s else min(step / max(cfg.iterations, 1), 1.0)
        scale = 1.0 if cfg.warmdown_frac <= 0 else min(1.0, (1.0 - progress) / cfg.warmdown_frac)
        return max(scale, cfg.min_lr_scale)
    if cfg.warmdown_iters <= 0:
        return 1.0
    if cap_s is None:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        scale = max((cfg.iterations - step) / max(cfg.warmdown_iters, 1), 0.0) if start <= step < cfg.iterations else 1.0
    else:
        step_ms = 1000.0 * elapsed_s / max(step, 1)
        warmdown_ms = cfg.warmdown_iters * step_ms
        remaining_ms = max(1000.0 * (cap_s - elapsed_s), 0.0)
        scale = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return max(scale, cfg.min_lr_scale)


def mean_over_ranks(value: torch.Tensor, ctx: RunContext) -> float:
    """The global mean of a per-rank scalar (each rank's loss covers only its share of the batch)."""
    if not ctx.dist.enabled:
        return float(value.item())
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / ctx.dist.world_size


def retain_freed_memory() -> bool:
    """CPU training: keep freed activation buffers in the heap instead of handing them back to the OS.

    A CPU step frees and reallocates hundreds of MB of activations. glibc serves blocks that large
    with fresh mmap pages and unmaps them on free, so every step page-faults ~100,000 zeroed pages
    back in: about 15% of a tiny-scale step's CPU time. Raising the mmap and trim thresholds
    makes the heap reuse them (the footprint stays at the peak, as it does on CUDA). A no-op
    where glibc's mallopt is not available; returns whether it applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3
    mmap_ok = bool(mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 1 << 25))
    return mmap_ok and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    base_model: nn.Module,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    dataset: Dataset,
    ctx: RunContext,
    hooks: LoopHooks,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Run warmup, then the timed loop. `model` may be the DDP/compiled wrapper of `base_model`."""
    cfg = ctx.recipe.train
    world = ctx.dist.world_size
    accum = grad_accum_steps(cfg, world)
    check_batch(cfg, world, accum)
    grad_scale = 1.0 / accum
    device = ctx.device
    clock = ctx.clock
    reserve = clock.reserve_seconds
    cap_s = cfg.max_wallclock_seconds - reserve if cfg.max_wallclock_seconds > 0 else None
    if cap_s is not None and cap_s <= 0:
        raise ConfigError(f"the training reserve of {reserve:.1f}s leaves no time under the {cfg.max_wallclock_seconds:.0f}s cap",
                          key="train.max_wallclock_seconds")
    muon = [opt for opt in optimizers if isinstance(opt, Muon)]
    # Document isolation trains on the records' varlen batches: each micro-batch one packed row, documents
    # cut into pieces of at most the step's sequence length (which a step-start hook may change).
    packed = ctx.recipe.model.doc_isolation
    if device.type == "cpu":
        retain_freed_memory()

    def new_loader() -> DistributedTokenLoader:
        return DistributedTokenLoader(dataset.train_stream(), ctx.dist.rank, world, device)

    def zero_grad() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def step_once(loader: DistributedTokenLoader, step: int, scale: float) -> torch.Tensor:
        zero_grad()
        train_loss = torch.zeros((), device=device)
        for micro in range(accum):
            if ctx.dist.enabled:
                model.require_backward_grad_sync = micro == accum - 1  # type: ignore[assignment]
            seq_len = clock.seq_len or cfg.seq_len
            x, y = loader.next_batch(cfg.batch_tokens, seq_len, accum, packed=packed)
            with ctx.autocast():
                loss = model(x, y, max_doc_len=seq_len) if packed else model(x, y)
            train_loss += loss.detach()
            (loss * grad_scale).backward()
        momentum = muon_momentum_at(step, ctx.recipe.optim)
        tapered = ctx.recipe.optim.muon_wd_taper_start_frac < 1.0
        for opt in muon:
            for group in opt.param_groups:
                group["momentum"] = momentum
                if tapered:  # #1729: keyed to the same elapsed fraction as the LR schedule
                    group["weight_decay"] = muon_weight_decay_at(ctx.clock.frac, ctx.recipe.optim)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        zero_grad()
        return train_loss / accum

    # --- warmup: prime every graph, then restore the true initial state -----------------------
    warm_start = time.perf_counter()
    if cfg.warmup_steps > 0:
        initial_model = {k: v.detach().cpu().clone() for k, v in base_model.state_dict().items()}
        initial_opt = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        phases: list[WarmupPhase | None] = [None, *hooks.warmup_phases(base_model)]
        model.train()
        loader = new_loader()
        for phase in phases:
            if phase is not None:
                phase.enter()
            for s in range(cfg.warmup_steps):
                step_once(loader, s, 1.0)
            if phase is not None:
                phase.exit()
        base_model.load_state_dict(initial_model, strict=True)
        for opt, state in zip(optimizers, initial_opt, strict=True):
            opt.load_state_dict(state)
        zero_grad()
        if ctx.dist.enabled:
            model.require_backward_grad_sync = True  # type: ignore[assignment]
    warmup_seconds = time.perf_counter() - warm_start

    # --- the timed loop ----------------------------------------------------------------------
    loader = new_loader()
    model.train()
    hooks.train_start(base_model)
    train_s = 0.0
    stop_after: int | None = None
    last_loss = float("nan")
    tokens_per_step = cfg.batch_tokens
    _sync(device)
    t0 = time.perf_counter()
    step = 0
    check_every = 1 if device.type == "cpu" else max(cfg.log_every, 1)
    while not (step == cfg.iterations or (stop_after is not None and step >= stop_after)):
        elapsed = train_s + time.perf_counter() - t0
        clock.step = step
        clock.frac = min(elapsed / cap_s, 1.0) if cap_s else step / max(cfg.iterations, 1)
        clock.lr_scale = lr_multiplier(step, elapsed, cfg, cap_s)
        before_step = elapsed
        hooks.step_start(base_model)
        loss_t = step_once(loader, step, clock.lr_scale)
        step += 1
        clock.step = step
        hooks.step_end(base_model)
        approx = train_s + time.perf_counter() - t0
        should_log = cfg.log_every > 0 and (step <= 10 or step % cfg.log_every == 0)
        if step % check_every == 0 or should_log:
            last_loss = mean_over_ranks(loss_t, ctx)
            if not math.isfinite(last_loss):
                raise TrainingError(f"training loss became {last_loss} at step {step}",
                                    hint="Lower the learning rates (optim.*_lr) or enable gradient clipping (train.grad_clip_norm).")
        if should_log:
            ctx.metrics.log(step=step, train_loss=last_loss, train_time_ms=round(1000 * approx),
                            step_avg_ms=round(1000 * approx / step, 2), lr_scale=round(clock.lr_scale, 5))
        if progress is not None:
            progress({"step": step, "loss": last_loss, "elapsed": approx,
                      "tokens_per_s": step * tokens_per_step / max(approx, 1e-9), "cap": cap_s,
                      "iterations": cfg.iterations})
        # Stop before the next step would cross the cap, so the budget holds strictly (the
        # challenge script stops after crossing it, e.g. 600.038 s for the baseline). The next
        # step is predicted as the slower of the average and the last one: steps slow down when
        # a technique switches more compute on, or when the machine is shared.
        next_step_s = max(approx / step, approx - before_step)
        reached = cap_s is not None and approx + next_step_s >= cap_s
        if ctx.dist.enabled and cap_s is not None:
            flag = torch.tensor(int(reached), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reached = bool(flag.item())
        if stop_after is None and reached:
            stop_after = step
    _sync(device)
    train_s += time.perf_counter() - t0
    if step:
        last_loss = mean_over_ranks(loss_t, ctx)
        if not math.isfinite(last_loss):
            raise TrainingError(f"training loss became {last_loss} by step {step}",
                                hint="Lower the learning rates (optim.*_lr) or enable gradient clipping.")
    return TrainResult(
        steps=step,
        train_seconds=train_s,
        stopped_early=stop_after is not None and step < cfg.iterations,
        final_train_loss=last_loss,
        tokens_seen=step * tokens_per_step,
        wallclock_cap_seconds=cap_s,
        reserve_seconds=reserve,
        warmup_seconds=warmup_seconds,
    )

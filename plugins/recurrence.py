"""Depth recurrence: run a segment of blocks several times through virtual layer index lists.

The records from #1394 on build one virtual layer sequence: the blocks before the loop, the loop
segment ``loop_start..loop_end`` ``num_loops + 1`` times, then the rest; its first half is the
U-Net encoder and the second half the decoder, and the number of skip connections is
``min(len(encoder), len(decoder))``. Every pass reuses the same weights, so the parameter count
does not change (beyond the extra skip weights) and each shared weight's gradient is the sum over
its passes. Looping switches on once the elapsed fraction of the training budget reaches
``enable_at`` (0.35 from #1493 on; with ``--steps`` the fraction is step / iterations), stays on,
and is always on for evaluation: at the end of training and whenever an artifact is decoded.
Both graphs are warmed before timing starts.

Variants: progressive recurrence (#1412: one extra pass from ``enable_at``, each further pass
from the next ``phase_at`` fraction) and untied MLPs for the repeated passes (#1204: a repeated
pass shares the block's attention, norms and scales but owns an MLP, copied from the block's
when the pass first runs).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pgolf.api import GPT, Block, ConfigError, RunContext, Technique, WarmupPhase


@dataclass
class RecurrenceConfig:
    loop_start: int = 3  # first looped block (#1493 on; #1394/#1412: 4)
    loop_end: int = 5  # last looped block, inclusive
    num_loops: int = 2  # extra passes: the segment runs num_loops + 1 times
    enable_at: float = 0.35  # fraction of the training budget at which looping switches on (#1394: 0.5)
    phase_at: list[float] = field(default_factory=list)  # progressive (#1412: [0.65]): one more pass at each
    untie_mlp: bool = False  # repeated passes own their MLP (#1204)

    def validate(self) -> tuple[str, str] | None:
        if self.loop_start < 0 or self.loop_end < self.loop_start:
            return "loop_end", f"need 0 <= loop_start <= loop_end, got {self.loop_start}..{self.loop_end}"
        if self.num_loops < 1:
            return "num_loops", f"num_loops counts extra passes and must be at least 1, got {self.num_loops}"
        if not 0.0 <= self.enable_at <= 1.0:
            return "enable_at", f"enable_at is a fraction of the training budget in [0, 1], got {self.enable_at}"
        if self.phase_at:
            if len(self.phase_at) != self.num_loops - 1:
                return "phase_at", (f"progressive recurrence adds one pass per phase: with num_loops {self.num_loops} "
                                    f"phase_at needs {self.num_loops - 1} fraction(s), got {len(self.phase_at)}")
            fracs = [self.enable_at, *self.phase_at]
            if any(b < a for a, b in zip(fracs, fracs[1:], strict=False)) or fracs[-1] > 1.0:
                return "phase_at", f"phase fractions must rise from enable_at and stay <= 1, got {fracs}"
        return None


# --- functional core: index lists --------------------------------------------------------------


def virtual_layers(num_layers: int, loop_start: int, loop_end: int, num_loops: int,
                   pass_block: Callable[[int, int], int] | None = None) -> list[int]:
    """The virtual layer sequence; `pass_block(layer, p)` names the block of pass p >= 1 (untied MLPs)."""
    segment = list(range(loop_start, loop_end + 1))
    seq = list(range(loop_start))
    for p in range(num_loops + 1):
        seq += segment if p == 0 or pass_block is None else [pass_block(layer, p) for layer in segment]
    return seq + list(range(loop_end + 1, num_layers))


def split_encoder_decoder(seq: list[int]) -> tuple[list[int], list[int]]:
    half = len(seq) // 2
    return seq[:half], seq[half:]


def build_loop_indices(num_layers: int, loop_start: int, loop_end: int, num_loops: int) -> tuple[list[int], list[int]]:
    """(encoder, decoder) block indices with the segment run num_loops + 1 times."""
    return split_encoder_decoder(virtual_layers(num_layers, loop_start, loop_end, num_loops))


def skip_count(encoder: list[int], decoder: list[int]) -> int:
    """U-Net skip connections of a virtual sequence."""
    return min(len(encoder), len(decoder))


def fit_problem(num_layers: int, cfg: RecurrenceConfig) -> str | None:
    """Why the loop does not fit a model of `num_layers` blocks, or None."""
    if cfg.loop_end >= num_layers:
        return (f"recurrence loops blocks {cfg.loop_start}..{cfg.loop_end} but the model has {num_layers} layers "
                f"(0..{num_layers - 1}); set techniques.recurrence.loop_start/loop_end inside that range.")
    return None


def lane_order_problem(num_layers: int, cfg: RecurrenceConfig, lane_start: int) -> str | None:
    """Why two-lane parallel residuals from `lane_start` would run this loop unlike the records' code, or None.

    pgolf keeps every decoder block after the lanes begin inside them; the records' loop takes a block
    below the start layer out of the lanes again (it runs on the stale single stream). The two agree only
    when no such block follows the lane start in the decoder, as at full size (loop 3-5, lanes from 8).
    """
    if lane_start < 0:
        return None
    _, decoder = build_loop_indices(num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops)
    begun = [i for i, layer in enumerate(decoder) if layer >= lane_start]
    late = [layer for layer in decoder[begun[0]:] if layer < lane_start] if begun else []
    if not late:
        return None
    return (f"parallel residual lanes start at layer {lane_start}, but the looped decoder {decoder} returns to "
            f"block(s) {sorted(set(late))} after that; the records' code runs those outside the lanes and pgolf "
            f"inside them. Start the lanes after the loop (techniques.parallel_residuals.start_layer > "
            f"{cfg.loop_end}) or end the loop earlier.")


# --- functional core: schedule -----------------------------------------------------------------


def loop_schedule(cfg: RecurrenceConfig) -> list[tuple[float, int]]:
    """(fraction, extra passes from then on): all passes at once, or one more per progressive phase."""
    if not cfg.phase_at:
        return [(cfg.enable_at, cfg.num_loops)]
    return [(frac, p) for p, frac in enumerate([cfg.enable_at, *cfg.phase_at], start=1)]


def passes_at(frac: float, schedule: list[tuple[float, int]]) -> int:
    return max((p for start, p in schedule if frac >= start), default=0)


@dataclass
class LoopSwitch:
    """Turns passes on as the training fraction grows; never turns them off."""

    schedule: list[tuple[float, int]]
    passes: int = 0

    def advance(self, frac: float) -> int | None:
        """The new number of extra passes if this fraction switches more on, else None."""
        target = passes_at(frac, self.schedule)
        if target <= self.passes:
            return None
        self.passes = target
        return target


# --- functional core: model surgery ------------------------------------------------------------


class RepeatedPass(nn.Module):
    """A later pass through a looped block with its own MLP; attention, norms and scales stay the
    block's (held outside the module tree, so they are stored and optimised once)."""

    def __init__(self, block: Block, loop_pass: int) -> None:
        super().__init__()
        self.mlp = copy.deepcopy(block.mlp)
        self.layer_idx = block.layer_idx
        self.loop_pass = loop_pass
        object.__setattr__(self, "shared", block)

    def forward(self, x: Tensor, x0: Tensor, doc: Any = None) -> Tensor:
        return self.shared(x, x0, mlp=self.mlp, doc=doc)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, post: Tensor,
                      resid: Tensor, doc: Any = None) -> tuple[Tensor, Tensor]:
        return self.shared.forward_lanes(lane0, lane1, x0, post, resid, mlp=self.mlp, doc=doc)


def repeated_passes(model: GPT) -> dict[tuple[int, int], int]:
    """(layer, pass) -> index in the model's virtual block numbering, for untied repeated passes."""
    n = len(model.blocks)
    return {(b.layer_idx, b.loop_pass): n + j for j, b in enumerate(model.extra_blocks) if isinstance(b, RepeatedPass)}


def loop_lists(model: GPT, cfg: RecurrenceConfig, passes: int) -> tuple[list[int], list[int]]:
    """(encoder, decoder) for `passes` extra passes, through untied pass blocks where they exist."""
    lookup = repeated_passes(model)
    pass_block = (lambda layer, p: lookup[(layer, p)]) if lookup else None
    return split_encoder_decoder(virtual_layers(len(model.blocks), cfg.loop_start, cfg.loop_end, passes, pass_block))


def apply_recurrence(model: GPT, cfg: RecurrenceConfig) -> None:
    """Build-time surgery: untied pass blocks (if asked) and skip weights sized for the full loop.

    Looping stays off until `set_loop_passes`; with it off the model computes the plain U-Net.
    """
    problem = fit_problem(len(model.blocks), cfg)
    if problem:
        raise ConfigError(problem, key="techniques.recurrence.loop_end")
    if cfg.untie_mlp:
        for p in range(1, cfg.num_loops + 1):
            for layer in range(cfg.loop_start, cfg.loop_end + 1):
                model.extra_blocks.append(RepeatedPass(model.blocks[layer], p))
    encoder, decoder = loop_lists(model, cfg, cfg.num_loops)
    model.grow_skips(skip_count(encoder, decoder))
    model.looping_active = False


def set_loop_passes(model: GPT, cfg: RecurrenceConfig, passes: int) -> None:
    """Walk the loop with `passes` extra passes (0 = the plain layer order)."""
    if passes > 0:
        model.encoder_indices, model.decoder_indices = loop_lists(model, cfg, passes)
    model.looping_active = passes > 0


@torch.no_grad()
def sync_repeated_mlps(model: GPT, passes: Iterable[int]) -> None:
    """Copy each looped block's MLP into its untied copies for these passes (when a pass first runs)."""
    wanted = set(passes)
    for b in model.extra_blocks:
        if isinstance(b, RepeatedPass) and b.loop_pass in wanted:
            for dst, src in zip(b.mlp.parameters(), b.shared.mlp.parameters(), strict=True):
                dst.copy_(src)


@dataclass
class LoopState:
    """Training-time state: the switch, and which passes have run (their untied MLPs copied)."""

    switch: LoopSwitch
    activations: list[dict[str, float]] = field(default_factory=list)


def activate(model: GPT, cfg: RecurrenceConfig, current: int, passes: int) -> None:
    """Go from `current` to `passes` extra passes; newly running untied passes start as the block's MLP."""
    sync_repeated_mlps(model, range(current + 1, passes + 1))
    set_loop_passes(model, cfg, passes)


# --- plugin ------------------------------------------------------------------------------------


class Recurrence(Technique):
    name = "recurrence"
    summary = "depth recurrence: loop a block segment via virtual layer lists, on from a fraction of training"
    Config = RecurrenceConfig
    stage = "train"
    after = ("ema",)  # at train end, untied passes that never ran copy the block's *averaged* MLP
    follows = ("#1493 loop 3-5 x3 from 0.35 (bundled, 1.0810); #1394 loop 4-5 from 0.5; #1412 progressive; "
               "#1204 untied repeat MLPs (mini recurrence ~0.002-0.003 BPB)")

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str] | None:
        model = ctx.recipe.model
        problem = fit_problem(model.num_layers, self.config)
        if problem is None and model.parallel_variant == "two_lane":
            problem = lane_order_problem(model.num_layers, self.config, model.parallel_start_layer)
        return [problem] if problem else None

    def pgolf_on_model_built(self, model: nn.Module, ctx: RunContext) -> None:
        apply_recurrence(model, self.config)

    def pgolf_contribute_warmup_phases(self, model: nn.Module, ctx: RunContext) -> list[WarmupPhase]:
        cfg: RecurrenceConfig = self.config

        def phase(passes: int) -> WarmupPhase:
            return WarmupPhase(f"recurrence:{passes}", enter=lambda: set_loop_passes(model, cfg, passes),
                               exit=lambda: set_loop_passes(model, cfg, 0))

        return [phase(passes) for _, passes in loop_schedule(cfg)]

    def pgolf_on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        ctx.stash[self.name] = LoopState(LoopSwitch(loop_schedule(self.config)))

    def pgolf_on_step_start(self, model: nn.Module, ctx: RunContext) -> None:
        state: LoopState = ctx.stash[self.name]
        current = state.switch.passes
        clock = ctx.clock
        passes = state.switch.advance(clock.frac)
        if passes is None:
            return
        activate(model, self.config, current, passes)
        state.activations.append({"step": clock.step, "frac": round(clock.frac, 6), "passes": passes})
        encoder, decoder = model.layer_plan()
        ctx.log(f"recurrence: {passes} extra pass(es) from step {clock.step} (frac {clock.frac:.3f}) "
                f"encoder:{encoder} decoder:{decoder}")

    def pgolf_on_train_end(self, model: nn.Module, ctx: RunContext) -> None:
        state: LoopState = ctx.stash[self.name]
        if state.switch.passes < self.config.num_loops:  # evaluation always loops fully
            activate(model, self.config, state.switch.passes, self.config.num_loops)

    def pgolf_on_artifact_loaded(self, model: nn.Module, ctx: RunContext) -> None:
        set_loop_passes(model, self.config, self.config.num_loops)  # the stored untied MLPs are already loaded

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any] | None:
        state: LoopState | None = ctx.stash.get(self.name)
        if state is None:
            return None
        return {"recurrence": {"activations": state.activations}}

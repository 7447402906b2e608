"""Progressive context growth (#2014): the training sequence length grows in stages.

#2014 trains at 1,024 tokens for the first 10% of the budget, at 2,048 until 70% and at 3,072 to the
end (``TRAIN_SEQ_SCHEDULE=1024@0.100,2048@0.700,3072@1.000``, ``TRAIN_SEQ_SCHEDULE_MODE=wallclock``).
A stage ``L@p`` holds while the training progress is at most p; progress is the elapsed fraction of
the wallclock budget (``mode: wallclock``; the step fraction when there is no cap) or step / iterations
(``mode: step``). The batch keeps its tokens: a stage changes how they are cut (with document isolation,
the longest piece of a document; otherwise the rows). At each change after step 0 the LR multiplier is
re-warmed linearly over ``SEQ_CHANGE_WARMUP_STEPS=32`` steps, ``min((step - change + 1) / 32, 1)``, on
top of the warmdown multiplier. The final stage is the model's context: #2014 sets ``TRAIN_SEQ_LEN``,
``EVAL_SEQ_LEN`` and ``TTT_EVAL_SEQ_LEN`` to 3,072, so this technique sets ``train.seq_len`` to the
longest stage and evaluation (and TTT) follow it unless ``eval.seq_len`` says otherwise. #2014 also
ran sliding windows with ``EVAL_STRIDE=1536`` (``techniques.sliding_window.stride``); its
``ROPE_TRAIN_SEQ_LEN=3072`` only feeds YaRN, which it left off, so nothing here corresponds to it.

Compiled runs: a new length is a new graph (``dynamic=False``), so every stage is warmed before timing
starts, as #2014's ``COMPILE_SHAPE_WARMUP`` does (it also warms each stage with looping on where the
stage overlaps depth recurrence; pgolf's warmup phases run one at a time, so a stage with looping on
compiles on its first step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from pgolf.api import RunContext, Technique, WarmupPhase, grad_accum_steps

Stages = list[tuple[float, int]]  # (progress up to which the stage holds, sequence length), rising


@dataclass
class ProgressiveContextConfig:
    schedule: str = "1024@0.100,2048@0.700,3072@1.000"  # TRAIN_SEQ_SCHEDULE of #2014
    mode: Literal["wallclock", "step"] = "wallclock"  # TRAIN_SEQ_SCHEDULE_MODE
    rewarm_steps: int = 32  # SEQ_CHANGE_WARMUP_STEPS: linear LR re-warmup after a change (0 = off)

    def validate(self) -> tuple[str, str] | None:
        try:
            parse_schedule(self.schedule)
        except ValueError as exc:
            return "schedule", str(exc)
        if self.rewarm_steps < 0:
            return "rewarm_steps", f"rewarm_steps must be 0 (off) or more, got {self.rewarm_steps}"
        return None


# --- functional core -------------------------------------------------------------------------------


def parse_schedule(text: str) -> Stages:
    """'1024@0.1,2048@0.7,3072@1.0' -> [(0.1, 1024), (0.7, 2048), (1.0, 3072)], sorted by progress; the last
    stage is extended to progress 1 when it stops short (#2014's parse_train_seq_schedule)."""
    stages: Stages = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        seq, sep, progress = raw.partition("@")
        if not sep:
            raise ValueError(f"stage {raw!r} is not of the form SEQ_LEN@PROGRESS, e.g. 1024@0.35")
        try:
            length, upto = int(seq.strip()), float(progress.strip())
        except ValueError:
            raise ValueError(f"stage {raw!r}: the sequence length must be an integer and the progress a "
                             "number") from None
        if length <= 0:
            raise ValueError(f"stage {raw!r}: sequence lengths must be positive")
        if not 0.0 < upto <= 1.0:
            raise ValueError(f"stage {raw!r}: progress fractions must lie in (0, 1]")
        stages.append((upto, length))
    if not stages:
        raise ValueError("the schedule names no stage; write e.g. 1024@0.1,2048@0.7,3072@1.0")
    stages.sort(key=lambda stage: stage[0])
    if stages[-1][0] < 1.0:
        stages.append((1.0, stages[-1][1]))
    return stages


def stage_seq_len(stages: Stages, progress: float) -> int:
    """The sequence length of the first stage whose progress bound is not yet passed."""
    return next((length for upto, length in stages if progress <= upto), stages[-1][1])


def rewarm_factor(step: int, change_step: int, rewarm_steps: int) -> float:
    """The LR factor `step` gets after a change at `change_step`: 1/N at the change, 1 from N - 1 steps on."""
    return min(max((step - change_step + 1) / max(rewarm_steps, 1), 0.0), 1.0)


def schedule_problems(stages: Stages, micro_batch_tokens: int) -> list[str]:
    """Stage lengths that do not cut a micro-batch into whole pieces (#2014 requires each to divide it)."""
    bad = sorted({length for _, length in stages if micro_batch_tokens % length})
    if not bad:
        return []
    return [f"progressive_context: stage length(s) {bad} do not divide the {micro_batch_tokens} tokens of a "
            "micro-batch (train.batch_tokens / (ranks x accumulation steps)); pick lengths that do."]


@dataclass
class ContextGrowth:
    """The stage in force and the step of the last change whose LR re-warmup is still running."""

    stages: Stages
    rewarm_steps: int
    seq_len: int = 0
    rewarm_from: int | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)

    def advance(self, step: int, progress: float) -> tuple[int, float, bool]:
        """(sequence length, LR factor, whether the stage changed) for the step about to run."""
        length = stage_seq_len(self.stages, progress)
        changed = length != self.seq_len
        if changed:
            self.seq_len = length
            self.changes.append({"step": step, "progress": round(progress, 6), "seq_len": length})
            if self.rewarm_steps > 0 and step > 0:
                self.rewarm_from = step
        factor = 1.0
        if self.rewarm_from is not None:
            factor = rewarm_factor(step, self.rewarm_from, self.rewarm_steps)
            if factor >= 1.0:
                self.rewarm_from = None
        return length, factor, changed


# --- plugin ----------------------------------------------------------------------------------------


class ProgressiveContext(Technique):
    name = "progressive_context"
    summary = "training context grows in stages (1k -> 2k -> 3k by budget fraction), LR re-warmed at each change"
    Config = ProgressiveContextConfig
    stage = "train"
    follows = ("#2014 TRAIN_SEQ_SCHEDULE=1024@0.100,2048@0.700,3072@1.000, SEQ_CHANGE_WARMUP_STEPS=32 "
               "(bundled with short-doc TTT: 1.05759 vs #1855's 1.06108)")

    def stages(self) -> Stages:
        return parse_schedule(self.config.schedule)

    def pgolf_configure(self, ctx: RunContext) -> None:
        ctx.recipe.train.seq_len = max(length for _, length in self.stages())

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        train, world = ctx.recipe.train, ctx.dist.world_size
        return schedule_problems(self.stages(), train.batch_tokens // (world * grad_accum_steps(train, world)))

    def pgolf_contribute_warmup_phases(self, model: nn.Module, ctx: RunContext) -> list[WarmupPhase]:
        clock = ctx.clock

        def phase(length: int) -> WarmupPhase:
            return WarmupPhase(f"progressive_context:{length}", enter=lambda: setattr(clock, "seq_len", length),
                               exit=lambda: setattr(clock, "seq_len", 0))

        final = ctx.recipe.train.seq_len  # the host's own warmup runs at it
        return [phase(length) for length in dict.fromkeys(length for _, length in self.stages()) if length != final]

    def pgolf_on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        ctx.stash[self.name] = ContextGrowth(self.stages(), self.config.rewarm_steps)

    def pgolf_on_step_start(self, model: nn.Module, ctx: RunContext) -> None:
        growth: ContextGrowth = ctx.stash[self.name]
        clock = ctx.clock
        progress = clock.frac
        if self.config.mode == "step":
            progress = min(clock.step / max(ctx.recipe.train.iterations, 1), 1.0)
        length, factor, changed = growth.advance(clock.step, progress)
        clock.seq_len = length
        clock.lr_scale *= factor
        if changed:
            ctx.log(f"progressive_context: seq_len {length} from step {clock.step} (progress {progress:.3f})")
            if growth.rewarm_from == clock.step:
                ctx.log(f"progressive_context: LR re-warmup over {self.config.rewarm_steps} steps from step {clock.step}")

    def pgolf_on_train_end(self, model: nn.Module, ctx: RunContext) -> None:
        ctx.clock.seq_len = 0

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any] | None:
        growth: ContextGrowth | None = ctx.stash.get(self.name)
        return None if growth is None else {"progressive_context": {"changes": growth.changes}}

"""Warmdown over a fraction of the run with a floor on the LR multiplier (#1787's MIN_LR).

The LR multiplier is 1 until the last `frac` of the training budget, then falls linearly towards
0 but never below `min_lr_scale`: ``max((1 - progress) / frac, min_lr_scale)``, where progress is
the elapsed fraction of the wallclock (or step / iterations with ``--steps``). #1787: the floor
"... so the final ~25% of training continues to deliver useful gradient updates". The schedule
itself is the host's (`pgolf.loop.lr_multiplier`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import RunContext, Technique, TrainConfig


@dataclass
class WarmdownConfig:
    frac: float = 0.75  # WARMDOWN_FRAC of #1787 (#1493: 0.72, #1855: 0.85)
    min_lr_scale: float = 0.10  # MIN_LR of #1787 and later

    def validate(self) -> tuple[str, str] | None:
        if not 0.0 < self.frac <= 1.0:
            return "frac", f"frac is the share of training spent in warmdown, in (0, 1], got {self.frac}"
        if not 0.0 <= self.min_lr_scale < 1.0:
            return "min_lr_scale", f"min_lr_scale must lie in [0, 1), got {self.min_lr_scale}"
        return None


def use_warmdown(train: TrainConfig, frac: float, min_lr_scale: float) -> None:
    """Warm down over the last `frac` of training, never below `min_lr_scale` of the base LR."""
    train.warmdown_frac = frac
    train.min_lr_scale = min_lr_scale


class Warmdown(Technique):
    name = "warmdown"
    summary = "linear warmdown over the last 75% of the budget to a floor of 10% of the LR"
    Config = WarmdownConfig
    stage = "train"
    follows = ("#1787 WARMDOWN_FRAC 0.75 + MIN_LR 0.10 (bundled, -0.00214 BPB vs #1736); #1493 frac 0.72; "
               "#1855 frac 0.85")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_warmdown(ctx.recipe.train, self.config.frac, self.config.min_lr_scale)

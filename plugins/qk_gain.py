"""QK-gain init: the learnable per-head scalar that multiplies q after the q/k RMSNorm and RoPE
starts at a larger value, i.e. a sharper attention temperature from step 0.

The baseline starts it at 1.5; records raised it to 4.0 (#1218), 5.0 (#1413) and 5.25 (#1493 and
later, "monotonic improvement from 4.0 to 5.25"). Only the initial value changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class QKGainConfig:
    init: float = 5.25  # #1493 on (#1218: 4.0, #1413: 5.0, baseline 1.5)

    def validate(self) -> tuple[str, str] | None:
        if self.init <= 0.0:
            return "init", f"init must be positive, got {self.init}"
        return None


def set_qk_gain(model: ModelConfig, init: float) -> None:
    """Start every head's q gain at `init`."""
    model.qk_gain_init = init


class QKGain(Technique):
    name = "qk_gain"
    summary = "initialise the per-head query gain at 5.25 instead of 1.5 (sharper attention from the start)"
    Config = QKGainConfig
    stage = "train"
    follows = "#1493 5.25 ('monotonic improvement from 4.0 to 5.25'); 4.0 in #1218, 5.0 in #1413 (with TTT -0.00283)"

    def pgolf_configure(self, ctx: RunContext) -> None:
        set_qk_gain(ctx.recipe.model, self.config.init)

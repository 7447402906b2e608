"""LeakyReLU(0.5)^2: the MLP activation relu(x)^2 becomes leaky_relu(x, 0.5)^2 (PR #493, record #549).

Negative pre-activations keep a (slope * x)^2 signal instead of a dead zero, so no MLP unit stops
receiving gradient. The math lives in `pgolf.model.MLP`; this technique switches it on.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class LeakyReluConfig:
    slope: float = 0.5  # negative slope before squaring (every record uses 0.5)

    def validate(self) -> tuple[str, str] | None:
        if not 0.0 < self.slope < 1.0:
            return "slope", f"slope must lie in (0, 1) (0 is plain relu^2), got {self.slope}"
        return None


def use_leaky_relu2(model: ModelConfig, slope: float = 0.5) -> None:
    """Make the MLP activation leaky_relu(x, slope)^2."""
    model.activation = "leaky_relu2"
    model.leaky_slope = slope


class LeakyRelu(Technique):
    name = "leaky_relu"
    summary = "MLP activation leaky_relu(x, 0.5)^2 instead of relu(x)^2"
    Config = LeakyReluConfig
    stage = "train"
    follows = "#549 (PR #493): -0.0021 BPB post-TTT in #549's seed-1337 ablation; PR #493 reported -0.003"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_leaky_relu2(ctx.recipe.model, self.config.slope)

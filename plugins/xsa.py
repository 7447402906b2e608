"""XSA, exclusive self-attention (arXiv:2603.09078), on the last N layers.

Each head's attention output loses its component along the token's own (normalised) value
vector, so attention carries only what other tokens contribute. No parameters. The math is
`pgolf.model.exclusive_self_attention`; records used the last 3 (#265), the last 4 (#287 to
#549) and then all 11 layers (#1019 and later).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class XSAConfig:
    last_n: int = 11  # layers from the top; >= num_layers means every layer (#1019 on: all 11)

    def validate(self) -> tuple[str, str] | None:
        if self.last_n < 1:
            return "last_n", f"last_n must be at least 1 (remove the technique to turn XSA off), got {self.last_n}"
        return None


def use_xsa(model: ModelConfig, last_n: int) -> None:
    """Exclusive self-attention on the last `last_n` layers."""
    model.xsa_last_n = last_n


class XSA(Technique):
    name = "xsa"
    summary = "exclusive self-attention: drop each head output's component along the token's own value"
    Config = XSAConfig
    stage = "train"
    follows = ("#1019 on all 11 layers (PR #638: -0.006 BPB vs last 4); #287 last 4 (with EMA 1.1318 -> 1.1271); "
               "#265 last 3 (~0.002 BPB)")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_xsa(ctx.recipe.model, self.config.last_n)

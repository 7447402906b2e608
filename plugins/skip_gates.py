"""Gated U-Net skips (#1493 and every later record in the challenge's record set).

The baseline adds each encoder output to its decoder step as ``x + w * skip`` (``skip_weights``,
init 1). With gates the skip is mixed in instead: ``lerp(w * skip, x, sigmoid(g))``, that is
``s * x + (1 - s) * w * skip`` per channel, with ``skip_gates`` [num_skips, model_dim] zero at
init (an even mix). Under two-lane parallel residuals the skip joins the attention lane, gated the
same way. The gates are scalar-AdamW parameters and stay float in the artifact
(`skip_gates` is one of the records' CONTROL_TENSOR_NAME_PATTERNS). The math is
`pgolf.model.unet_skip`.
"""

from __future__ import annotations

from pgolf.api import ModelConfig, NoConfig, RunContext, Technique


def use_skip_gates(model: ModelConfig) -> None:
    """Mix every U-Net skip in through a learned per-channel sigmoid gate."""
    model.skip_gates = True


class SkipGates(Technique):
    name = "skip_gates"
    summary = "U-Net skips mixed in as lerp(w * skip, x, sigmoid(g)) with per-channel gates, 0 at init"
    Config = NoConfig
    stage = "train"
    follows = ("#1493 on (SKIP_GATES_ENABLED=1 in every record from #1493 to #2135; never isolated, "
               "bundled from #1493's 1.0810)")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_skip_gates(ctx.recipe.model)

"""Polar Express Newton-Schulz coefficients for Muon (PR #1344, in #1787 and every later record).

Stock Muon applies one (a, b, c) = (3.4445, -4.7750, 2.0315) at every iteration. Polar Express
uses a different minimax-optimal tuple per iteration (five of them), which brings the singular
values of the update closer to 1 in the same five steps. The table has no sixth entry: the record
silently reuses the five for a longer run, pgolf refuses `muon_backend_steps` above 5 instead.
The math is `pgolf.optim.zeropower_via_newtonschulz5` with `POLAR_EXPRESS_COEFFS`.
"""

from __future__ import annotations

from pgolf.api import OptimConfig, RunContext, Technique

TABLE_STEPS = 5  # iterations in the Polar Express table (#1787 `_PE_COEFFS`)


def use_polar_express(optim: OptimConfig) -> None:
    optim.muon_ns_coefficients = "polar_express"


class PolarExpress(Technique):
    name = "polar_express"
    summary = "Muon's Newton-Schulz with Polar Express's per-iteration minimax coefficients (5 steps)"
    stage = "train"
    follows = "#1787 (ported from PR #1344; bundled with MIN_LR, sparse gate and fused CE: -0.00214 BPB vs #1736)"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_polar_express(ctx.recipe.optim)

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        steps = ctx.recipe.optim.muon_backend_steps
        if steps > TABLE_STEPS:
            return [f"techniques.polar_express: its coefficient table holds {TABLE_STEPS} Newton-Schulz iterations, "
                    f"but optim.muon_backend_steps is {steps}; set it to {TABLE_STEPS} (the records' value) or fewer."]
        return []

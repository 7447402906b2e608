"""Parallel residuals from a start layer on (GPT-J / modded-nanogpt PR #230 style).

Two variants, both in `pgolf.model`:

* ``two_lane`` (#1204, #1529 and later): from the first decoder block at or past `start_layer`,
  the residual stream splits into two lanes. Attention reads lane 0 (mixed with x0 through
  ``resid_mix``), the MLP reads lane 1, and each writes into both lanes with learned weights
  (``parallel_post_lambdas[layer, branch, lane]``, init 1; ``parallel_resid_lambdas[layer, lane]``,
  init 1.1). The final hidden state is the mean of the lanes. Encoder blocks stay single-lane.
* ``sum`` (#1412, #1493): ``x + attn(norm x) + mlp(norm x)`` in every block from `start_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.api import ModelConfig, RunContext, Technique

Variant = Literal["two_lane", "sum"]


@dataclass
class ParallelResidualsConfig:
    start_layer: int = 8  # #1529 on (#1204, #1412, #1493: 7)
    variant: Variant = "two_lane"

    def validate(self) -> tuple[str, str] | None:
        if self.start_layer < 0:
            return "start_layer", f"start_layer must be a layer index, got {self.start_layer}"
        return None


def use_parallel_residuals(model: ModelConfig, start_layer: int, variant: Variant = "two_lane") -> None:
    """Parallel attention and MLP from `start_layer` on, as two lanes or a plain sum."""
    model.parallel_start_layer = start_layer
    model.parallel_variant = variant


def start_problem(model: ModelConfig, start_layer: int) -> str | None:
    if start_layer >= model.num_layers:
        return (f"parallel_residuals starts at layer {start_layer} but the model has {model.num_layers} layers, "
                f"so nothing would change; set techniques.parallel_residuals.start_layer below {model.num_layers}.")
    return None


class ParallelResiduals(Technique):
    name = "parallel_residuals"
    summary = "attention and MLP read separate residual lanes (two_lane) or run side by side (sum) from a layer on"
    Config = ParallelResidualsConfig
    stage = "train"
    follows = ("#1529/#1855 two lanes from layer 8 (#1529: p=0.001 vs #1514); #1204 two lanes from 7 "
               "(-0.0022 BPB, one sample); #1412/#1493 summed from 7")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_parallel_residuals(ctx.recipe.model, self.config.start_layer, self.config.variant)

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str] | None:
        problem = start_problem(ctx.recipe.model, self.config.start_layer)
        return [problem] if problem else None

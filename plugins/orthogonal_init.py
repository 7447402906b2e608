"""Orthogonal init of the large matrices (#1855/#1868/#2135, from the #1019 lineage on).

Each layer's q, k, v and MLP up projection start as orthogonal matrices (gain 1), drawn in the
records' order (q, k, v of every layer, then every MLP up projection, then any other Linear with
both dims >= 64 that is not zero-initialised); the attention and MLP output projections and an
untied head stay zero, and the tied embedding keeps its N(0, 0.005) init. Same seed, same draws:
the order is fixed, so a run is reproducible. The math is `pgolf.model.orthogonal_init_targets`.
"""

from __future__ import annotations

from pgolf.api import ModelConfig, RunContext, Technique


def use_orthogonal_init(model: ModelConfig) -> None:
    """Initialise the large block matrices orthogonally instead of nn.Linear's uniform default."""
    model.orthogonal_init = True


class OrthogonalInit(Technique):
    name = "orthogonal_init"
    summary = "orthogonal init (gain 1) of q, k, v, MLP up and other >= 64x64 matrices; output projections stay zero"
    stage = "train"
    follows = ("#1855/#1868/#2135 `_init_weights` (bundled; inherited from the #1019 banked model, "
               "orthogonal since the 2026-03-20 SmearGate/BigramHash record)")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_orthogonal_init(ctx.recipe.model)

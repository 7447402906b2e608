"""Partial RoPE with LN scale (record #315).

Rotary embeddings rotate only the first `dims` of each head's dimensions (16 of 64 in the records);
the rest carry position-free content. LN scale multiplies every block's RMSNorm outputs by
1/sqrt(layer + 1), damping the deeper layers' contributions. #315 introduced both together.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class PartialRopeConfig:
    dims: int = 16  # rotary dims per head (ROPE_DIMS=16 of 64 in every record since #315)
    ln_scale: bool = True  # scale block norms by 1/sqrt(layer + 1) (LN_SCALE=1)

    def validate(self) -> tuple[str, str] | None:
        if self.dims <= 0 or self.dims % 2:
            return "dims", f"dims must be a positive even number of rotary dimensions, got {self.dims}"
        return None


def use_partial_rope(model: ModelConfig, dims: int = 16, ln_scale: bool = True) -> None:
    """Rotate only the first `dims` head dimensions; optionally scale block norms by 1/sqrt(layer+1)."""
    model.rope_dims = dims
    model.ln_scale = ln_scale


def head_dim_problem(model: ModelConfig, dims: int) -> str | None:
    head_dim = model.model_dim // model.num_heads
    if dims > head_dim:
        return (f"partial_rope rotates {dims} dims per head but the head dimension is {head_dim}; "
                f"set techniques.partial_rope.dims to at most {head_dim}.")
    return None


class PartialRope(Technique):
    name = "partial_rope"
    summary = "RoPE on the first 16 dims of each head only, plus 1/sqrt(layer+1) norm scaling"
    Config = PartialRopeConfig
    stage = "train"
    follows = "#315: partial RoPE 16/64 + LN scale took 1.1271 -> 1.1248 (its late QAT never ran)"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_partial_rope(ctx.recipe.model, self.config.dims, self.config.ln_scale)

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str] | None:
        problem = head_dim_problem(ctx.recipe.model, self.config.dims)
        return [problem] if problem else None

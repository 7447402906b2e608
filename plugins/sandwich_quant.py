"""Sandwich quantization: bit widths by position, wider at the ends of the network, narrower inside.

The records' mixed precision (reference/techniques.md §2): block matrices at int6 (#1285 ran all 66
at int6), the tied embedding wider because it is both the input table and the output head (int8 in
#287-#1394, int7 from #1586/#1626: "-530 KB artifact, ~0 BPB cost"), and, in
`2026-03-19_10L_MixedPrecision`, the first and last blocks kept at int8 while the middle ones were
coarsened (quant gap 0.0018 vs the baseline's 0.0093). The WIP PRs #1042/#1721 call the last-layer
int8 variant "sandwich". Small tensors and control tensors keep the host's fp16/fp32 passthrough.

Codes always live in int8 containers: narrower widths shrink the artifact through the entropy coder.
benchmarks/export.py measures that against packing the codes into exactly `bits` bits before the
same coder. On 1.57M SDClip codes (same clip for every width) the int8 containers won at every width
and with every codec; brotli-11: int5 640 KB vs 839 KB packed, int6 649 KB vs 775 KB, int7 654 KB
vs 964 KB, against about 640 KB of zero-order entropy. Packing hides the byte-aligned symbols the
coder models, so no packed storage kind is offered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from pgolf.api import QuantSpec, RunContext, Technique

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
Position = Literal["embed", "outer", "middle", "middle_mlp", "other"]


@dataclass
class SandwichConfig:
    outer_layers: int = 1  # first and last N blocks (10L_MixedPrecision kept 3 of 10 at each end; #1042: last one)
    outer_bits: int = 8  # 10L_MixedPrecision / #1042
    middle_bits: int = 6  # #1285: every block matrix at int6
    middle_mlp_bits: int | None = None  # #180 ran MLPs at int5; None = middle_bits
    embed_bits: int = 7  # #1586 via #1626 (int8 in #287-#1394)


def position_of(name: str, num_layers: int, outer_layers: int) -> Position:
    """Where a tensor sits: the vocab matrices, an outer or middle block, or elsewhere.

    ``extra_blocks.*`` (per-pass copies made by depth recurrence) belong to the looped middle.
    """
    if name.startswith(("tok_emb.", "lm_head.")):
        return "embed"
    match = _BLOCK.match(name)
    if match:
        layer = int(match.group(1))
        if layer < outer_layers or layer >= num_layers - outer_layers:
            return "outer"
        return "middle_mlp" if ".mlp." in name else "middle"
    if name.startswith("extra_blocks."):
        return "middle_mlp" if ".mlp." in name else "middle"
    return "other"


def sandwich_bits(name: str, num_layers: int, cfg: SandwichConfig) -> int:
    """The policy: tensor name -> bit width of its integer codes."""
    position = position_of(name, num_layers, cfg.outer_layers)
    if position == "embed":
        return cfg.embed_bits
    if position == "outer":
        return cfg.outer_bits
    if position == "middle_mlp" and cfg.middle_mlp_bits is not None:
        return cfg.middle_mlp_bits
    return cfg.middle_bits


class SandwichQuant(Technique):
    name = "sandwich_quant"
    summary = "Bit widths by position: embedding and outer blocks wider (int7/int8), middle blocks int6 (MLP int5 optional)."
    Config = SandwichConfig
    stage = "export"
    before = ("freq_weighting", "sdclip", "gptq")
    follows = "10L_MixedPrecision (outer int8, gap 0.0018 vs 0.0093), #1285 (all-int6 blocks), #1626 (int7 embedding)"

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        widths = [c.outer_bits, c.middle_bits, c.embed_bits] + ([c.middle_mlp_bits] if c.middle_mlp_bits else [])
        problems = []
        if not all(2 <= b <= 8 for b in widths):
            problems.append("techniques.sandwich_quant: every *_bits must lie in 2..8 (codes are stored in int8).")
        if c.outer_layers < 0 or 2 * c.outer_layers > ctx.recipe.model.num_layers:
            problems.append(f"techniques.sandwich_quant: outer_layers must lie in 0..{ctx.recipe.model.num_layers // 2} "
                            f"for a {ctx.recipe.model.num_layers}-layer model.")
        return problems

    def pgolf_on_quant_spec(self, name: str, tensor: Tensor, spec: QuantSpec, ctx: RunContext) -> None:
        if spec.scheme != "int":
            return
        spec.bits = sandwich_bits(name, ctx.recipe.model.num_layers, self.config)
        spec.note(self.name, f"int{spec.bits} ({position_of(name, ctx.recipe.model.num_layers, self.config.outer_layers)})")

"""Codec: choose the artifact's compressor (and byte shuffle) from the recipe, so it can be ablated.

The records moved from zlib-9 (baseline) to zstd-22 (#162), LZMA preset 9 (#1019) and then brotli
quality 11 after a stride-2 byte shuffle (#1204, #1394 and every later record). The host implements
the codecs and always reports the real compressed size; this technique only sets ``export.codec``,
``export.level`` and ``export.byte_shuffle`` before anything runs, so toggling it off in an
ablation falls back to the recipe's own export settings (the baseline: zlib-9).

Settings that equal the recipe's own (the same codec, the same effective level, the same shuffle)
leave the recipe untouched, so such a run fails as "never acted" rather than reporting an
ablation row that changed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.api import ExportConfig, RunContext, Technique


@dataclass
class CodecConfig:
    codec: Literal["zlib", "lzma", "brotli"] = "brotli"  # #1204/#1394 onwards
    level: int | None = None  # None = the codec's strongest (zlib 9, lzma 9, brotli 11)
    byte_shuffle: int = 2  # #1204/#1394: stride 2 groups the bytes of 16-bit values (fp16 scales)


# Each codec's valid levels; the top of the range is its strongest, the level `None` stands for.
LEVEL_RANGES = {"zlib": (0, 9), "lzma": (0, 9), "brotli": (0, 11)}


def effective_level(codec: str, level: int | None) -> int:
    """The level a codec runs at: `level`, or the codec's strongest for None."""
    return LEVEL_RANGES[codec][1] if level is None else level


def configure_export(export: ExportConfig, cfg: CodecConfig) -> None:
    """Write the codec choice into a recipe's export section (untouched if it already says the same)."""
    wanted = (cfg.codec, effective_level(cfg.codec, cfg.level), cfg.byte_shuffle)
    if (export.codec, effective_level(export.codec, export.level), export.byte_shuffle) == wanted:
        return
    export.codec, export.level, export.byte_shuffle = wanted


class Codec(Technique):
    name = "codec"
    summary = "Compress the artifact with zlib, lzma or brotli-11, optionally after a byte shuffle."
    Config = CodecConfig
    stage = "export"
    follows = "#1394 (brotli-11 + byte shuffle; NR XNOR-Net: brotli beats lzma by ~50 KB), #1019 (lzma-9)"

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        problems = []
        low, high = LEVEL_RANGES[c.codec]
        if c.level is not None and not low <= c.level <= high:
            problems.append(f"techniques.codec: level {c.level} is out of range for {c.codec} ({low}..{high}).")
        if not 0 <= c.byte_shuffle <= 255:
            problems.append("techniques.codec: byte_shuffle is a stride in 0..255 (0 or 1 = off, 2 = 16-bit values).")
        return problems

    def pgolf_configure(self, ctx: RunContext) -> None:
        configure_export(ctx.recipe.export, self.config)

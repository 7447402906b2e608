"""Codec: choose the artifact's compressor (and byte shuffle) from the recipe, so it can be ablated.

The records moved from zlib-9 (baseline) to zstd-22 (#162), LZMA preset 9 (#1019) and then brotli
quality 11 after a stride-2 byte shuffle (#1204, #1394 and every later record). The host implements
the codecs and always reports the real compressed size; this technique only sets ``export.codec``,
``export.level`` and ``export.byte_shuffle`` before anything runs, so toggling it off in an
ablation falls back to the recipe's own export settings (the baseline: zlib-9).

``codec: pergroup`` is #1855's per-group compression (kept by #1908-#2060; #2130/#2135 use the
``single`` layout): the int8 code matrices grouped by role, the hot groups' rows in nearest-neighbour
order, every matrix transposed, each group through a ZPAQ-class coder and the rest through brotli
(`pgolf.codecs`). The record shells out to ``lrzip -z -L 9``; ``coder: auto`` does the same when the
lrzip program is installed, else uses the `zpaq` binding (``pip install 'pgolf[zpaq]'``), else brotli,
and writes the coder it picked into the recipe. Unlike the record, nothing is unpickled on load.

Settings that equal the recipe's own (the same codec, the same effective level, the same shuffle)
leave the recipe untouched, so such a run fails as "never acted" rather than reporting an
ablation row that changed nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.api import CODER_INSTALL, ExportConfig, RunContext, Technique, coder_available, resolve_coder


@dataclass
class CodecConfig:
    codec: Literal["zlib", "lzma", "brotli", "pergroup"] = "brotli"  # #1204/#1394 onwards; pergroup #1855
    level: int | None = None  # None = the codec's strongest (zlib 9, lzma 9, brotli 11; pergroup: its rest's brotli)
    byte_shuffle: int = 2  # #1204/#1394: stride 2 groups the bytes of 16-bit values (fp16 scales)
    # pergroup only. auto = lrzip (#1855's `lrzip -z -L 9`) when installed, else the zpaq binding, else brotli.
    coder: Literal["auto", "lrzip", "zpaq", "brotli"] = "auto"
    layout: Literal["roles", "single"] = "roles"  # roles: #1855-#2060 (7 role groups); single: #2130/#2135


# Each codec's valid levels; the top of the range is its strongest, the level `None` stands for.
LEVEL_RANGES = {"zlib": (0, 9), "lzma": (0, 9), "brotli": (0, 11), "pergroup": (0, 11)}


def effective_level(codec: str, level: int | None) -> int:
    """The level a codec runs at: `level`, or the codec's strongest for None."""
    return LEVEL_RANGES[codec][1] if level is None else level


def configure_export(export: ExportConfig, cfg: CodecConfig) -> None:
    """Write the codec choice into a recipe's export section (untouched if it already says the same)."""
    wanted = (cfg.codec, effective_level(cfg.codec, cfg.level), cfg.byte_shuffle)
    grouping = (resolve_coder(cfg.coder), cfg.layout) if cfg.codec == "pergroup" else None
    if ((export.codec, effective_level(export.codec, export.level), export.byte_shuffle) == wanted
            and grouping in (None, (export.group_coder, export.group_layout))):
        return
    export.codec, export.level, export.byte_shuffle = wanted
    if grouping:
        export.group_coder, export.group_layout = grouping


class Codec(Technique):
    name = "codec"
    summary = ("Compress the artifact with zlib, lzma or brotli-11 (optionally after a byte shuffle), or per "
               "role group with a ZPAQ coder (pergroup).")
    Config = CodecConfig
    stage = "export"
    follows = ("#1394 (brotli-11 + byte shuffle; NR XNOR-Net: brotli beats lzma by ~50 KB), #1019 (lzma-9), "
               "#1855 (pergroup lrzip/ZPAQ: ~280 KB under brotli)")

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        problems = []
        low, high = LEVEL_RANGES[c.codec]
        if c.level is not None and not low <= c.level <= high:
            problems.append(f"techniques.codec: level {c.level} is out of range for {c.codec} ({low}..{high}).")
        if not 0 <= c.byte_shuffle <= 255:
            problems.append("techniques.codec: byte_shuffle is a stride in 0..255 (0 or 1 = off, 2 = 16-bit values).")
        if c.codec == "pergroup" and c.coder in CODER_INSTALL and not coder_available(c.coder):
            problems.append(f"techniques.codec: coder {c.coder} is not installed; {CODER_INSTALL[c.coder]}, "
                            "or choose coder: auto.")
        return problems

    def pgolf_configure(self, ctx: RunContext) -> None:
        configure_export(ctx.recipe.export, self.config)

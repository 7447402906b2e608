"""Decoupled weight decay for Muon (``p *= 1 - lr * wd`` before each update), with the embedding
and scalar AdamW decay the same records use.

Records raised Muon WD from 0.04 (#162) to 0.085 (#1218: compressed size tracks weight RMS,
R^2 ~ 0.99, which paid for a 4x MLP), 0.090 (#1285: ~280 KB of artifact headroom for all-int6)
and 0.095 with embedding WD 0.085 and scalar Adam WD 0.02 (#1493 and every later record).
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import OptimConfig, RunContext, Technique


@dataclass
class MuonWDConfig:
    weight_decay: float = 0.095  # Muon (block matrices), MUON_WD in #1493 on
    embed_weight_decay: float = 0.085  # AdamW on the token embedding, EMBED_WD
    adam_weight_decay: float = 0.02  # AdamW on scalars and control tensors, ADAM_WD

    def validate(self) -> tuple[str, str] | None:
        for key in ("weight_decay", "embed_weight_decay", "adam_weight_decay"):
            if getattr(self, key) < 0.0:
                return key, f"{key} must not be negative, got {getattr(self, key)}"
        return None


def use_weight_decay(optim: OptimConfig, muon: float, embed: float, adam: float) -> None:
    """Decoupled weight decay: `muon` on block matrices, `embed` on the embedding, `adam` on the rest."""
    optim.muon_weight_decay = muon
    optim.embed_weight_decay = embed
    optim.adam_weight_decay = adam


class MuonWD(Technique):
    name = "muon_wd"
    summary = "decoupled weight decay: Muon 0.095, embedding 0.085, scalars 0.02 (smaller, more compressible weights)"
    Config = MuonWDConfig
    stage = "train"
    follows = ("#1493 (muon 0.095 / embed 0.085 / adam 0.02, bundled); #162 0.04; #1218 0.085; "
               "#1285 0.090 ('~280K bytes of artifact headroom')")

    def pgolf_configure(self, ctx: RunContext) -> None:
        cfg: MuonWDConfig = self.config
        use_weight_decay(ctx.recipe.optim, cfg.weight_decay, cfg.embed_weight_decay, cfg.adam_weight_decay)

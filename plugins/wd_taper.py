"""Late taper of Muon's weight decay (#1729 "Mild WD Taper").

Full decoupled weight decay keeps the weights small and compressible while they still move a
lot; late in training they have settled, so #1729 trades some of it for optimisation: Muon's WD
stays at its value until 70% of the training budget, then falls linearly to 50% of it at the
end, keyed to the same elapsed fraction as the LR schedule. Only Muon's decay tapers (the
embedding and scalar AdamW decays stay). It scales whatever `muon_wd` (or the recipe) sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import OptimConfig, RunContext, Technique


@dataclass
class WDTaperConfig:
    start_frac: float = 0.70  # WD_TAPER_START_FRAC of #1729
    final_mult: float = 0.50  # WD_TAPER_FINAL_MULT of #1729

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if not 0.0 <= self.start_frac < 1.0:
            problems.append(("start_frac", f"start_frac is the elapsed fraction where the taper begins, in [0, 1), "
                                           f"got {self.start_frac}"))
        if self.final_mult < 0.0:
            problems.append(("final_mult", f"final_mult must not be negative, got {self.final_mult}"))
        return problems


def use_wd_taper(optim: OptimConfig, start_frac: float, final_mult: float) -> None:
    """Taper Muon's weight decay linearly from `start_frac` of training to `final_mult` of it at the end."""
    optim.muon_wd_taper_start_frac = start_frac
    optim.muon_wd_taper_final_mult = final_mult


class WDTaper(Technique):
    name = "wd_taper"
    summary = "Muon weight decay full until 70% of training, then linearly down to 50% of it at the end"
    Config = WDTaperConfig
    stage = "train"
    follows = "#1729 (with CaseOps: 1.07193 -> 1.06780, 'small but consistent BPB win' for the taper)"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_wd_taper(ctx.recipe.optim, self.config.start_frac, self.config.final_mult)

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        if ctx.recipe.optim.muon_weight_decay <= 0.0:
            return ["techniques.wd_taper: Muon's weight decay is 0, so there is nothing to taper; enable muon_wd "
                    "(or set optim.muon_weight_decay)."]
        return []

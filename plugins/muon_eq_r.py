"""MuonEq-R: normalise each row of Muon's Nesterov update before Newton-Schulz (PR #1217/#1260).

Rows with large gradients no longer dominate the orthogonalised step. No parameters and no
bytes; the math is `pgolf.optim.Muon` with ``row_normalize``.
"""

from __future__ import annotations

from pgolf.api import OptimConfig, RunContext, Technique


def use_row_normalized_muon(optim: OptimConfig) -> None:
    optim.muon_row_normalize = True


class MuonEqR(Technique):
    name = "muon_eq_r"
    summary = "row-normalised Muon: each row of the update has unit norm before Newton-Schulz"
    stage = "train"
    follows = "#1285 (PR #1217/#1260, arXiv:2603.28254): 'zero-byte cost, ~0.001 BPB'; in every record from #1394"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_row_normalized_muon(ctx.recipe.optim)

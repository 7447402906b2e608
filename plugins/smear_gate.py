"""SmearGate with the BOS fix (v2 of PR #1667, fix from #1851/#1855).

Each token embedding takes in a gated share of the previous token's:
``x_t += lam * sigmoid(w . x_t[:12]) * x_{t-1}``, with w and lam zero at init (identity). In a
packed stream the previous token of a document's BOS is the last token of the previous document,
so without the fix that token leaks into the next document's first position; the fix multiplies
the term by ``input_id_t != BOS``. #1797 found the leak had biased its score by 0.00255 BPB. The fix
is on by default; ``bos_fix: false`` exists only to measure the leak.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class SmearGateConfig:
    bos_fix: bool = True  # never smear across a BOS (the records' cross-document leak fix)


def use_smear_gate(model: ModelConfig, bos_fix: bool = True) -> None:
    """Add the previous-token SmearGate at the input (masked at BOS unless `bos_fix` is off)."""
    model.smear_gate = True
    model.smear_bos_fix = bos_fix


class SmearGate(Technique):
    name = "smear_gate"
    summary = "gated mix of the previous token's embedding into each token's, never across a BOS"
    Config = SmearGateConfig
    stage = "train"
    follows = ("#1667 SmearGate v2 (bundled, 1.07139); BOS fix in #1851/#1855 (#1797's leak had biased it "
               "by +0.00255 BPB)")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_smear_gate(ctx.recipe.model, self.config.bos_fix)

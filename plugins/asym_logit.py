"""AsymLogit: separate learnable softcaps for positive and negative logits (#1923, kept by #2060/#2135).

Scoring uses ``where(z > 0, sp * tanh(z / sp), sn * tanh(z / sn))`` with `softcap_pos` (sp) and
`softcap_neg` (sn) both starting at the softcap, so the model is unchanged at init. The training
loss keeps the plain softcap (the records' fused and unfused training paths ignore the two
scalars), and no training optimizer holds them; they are ordinary model parameters, so a
test-time pass that trains the model's parameters through the scoring path trains them. They
travel in the artifact as float16 passthrough scalars, as in the records. The math is
`pgolf.model.asym_softcap`.

In #1923 and #2135 the global TTT passes compute their loss through the training forward, so the
two scalars get no gradient there either and the records score with sp = sn = 30, the plain cap.
"""

from __future__ import annotations

from pgolf.api import ModelConfig, RunContext, Technique


def use_asym_logit(model: ModelConfig) -> None:
    """Score with separate positive and negative softcaps, both starting at `model.logit_softcap`."""
    model.asym_logit = True


class AsymLogit(Technique):
    name = "asym_logit"
    summary = "learnable positive/negative logit softcaps for scoring (start at the softcap; frozen in training)"
    stage = "train"
    follows = ("#1923 AsymLogit Rescale (bundled with AWQ-lite: 1.0597), kept by #2060 and #2135; idea from "
               "modded-nanogpt PR #181")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_asym_logit(ctx.recipe.model)

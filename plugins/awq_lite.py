"""AWQ-lite: the most salient input-column groups of the whole model coded at int8 inside GPTQ.

PR #1908 (kept by #1923-#2135) scores every 64-column group of every GPTQ'd matrix narrower than
int8 by activation-aware saliency ``sum over the group of act_rms_j · mean_i |W_ij|``, where
act_rms_j is the RMS of input column j over the calibration tokens, and codes the global top K
groups (K = 1) at int8, with a second per-row fp16 scale from the same clip, inside the same
full-Hessian GPTQ solve; the other columns keep their width. act_rms is the square root of the
diagonal of the host's mean calibration Hessian ``E[XᵀX]`` (the record accumulates the same sum
of squares per column over the same calibration pass). The choice spans tensors, so it is made in
`pgolf_on_quant_specs`, once every spec is known; GPTQ and round to nearest both honour the
spec's column groups, and the artifact stores the group starts (int16) and wide scales (fp16) as
the record does.

Functional core: `activation_rms`, `group_saliency`, `select_groups`, `protect`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pgolf.api import QuantSpec, RunContext, Technique


@dataclass
class AWQLiteConfig:
    bits: int = 8  # AWQ_LITE_BITS (#1908)
    group_top_k: int = 1  # AWQ_LITE_GROUP_TOP_K
    group_size: int = 64  # AWQ_LITE_GROUP_SIZE


def activation_rms(hessian: Tensor) -> Tensor:
    """Per input column RMS of the calibration activations: sqrt(diag E[XᵀX])."""
    return hessian.diagonal().float().clamp_min(0).sqrt().cpu()


def group_saliency(weight: Tensor, act_rms: Tensor, group_size: int) -> list[tuple[float, int]]:
    """(score, first column) of each whole group: sum of act_rms_j · mean_i |W_ij| over the group."""
    saliency = act_rms.float() * weight.float().abs().mean(dim=0)
    return [(float(saliency[start : start + group_size].sum()), start)
            for start in range(0, (weight.shape[1] // group_size) * group_size, group_size)]


def select_groups(candidates: list[tuple[float, str, int]], top_k: int) -> dict[str, list[int]]:
    """The top-K (score, tensor, start) candidates across tensors; ties keep candidate order."""
    chosen: dict[str, list[int]] = {}
    for _score, name, start in sorted(candidates, key=lambda c: -c[0])[:top_k]:
        chosen.setdefault(name, []).append(start)
    return chosen


def protect(specs: Mapping[str, QuantSpec], state: Mapping[str, Tensor], hessians: Mapping[str, Tensor],
            cfg: AWQLiteConfig) -> dict[str, list[int]]:
    """Mark the chosen groups in the specs of integer matrices narrower than `cfg.bits` that have a Hessian."""
    candidates = []
    for name, spec in specs.items():
        if spec.scheme == "int" and state[name].ndim == 2 and name in hessians and spec.bits < cfg.bits:
            rms = activation_rms(hessians[name])
            candidates += [(score, name, start) for score, start in group_saliency(state[name], rms, cfg.group_size)]
    chosen = select_groups(candidates, cfg.group_top_k)
    for name, starts in chosen.items():
        spec = specs[name]
        spec.col_groups, spec.col_group_size, spec.col_group_bits = starts, cfg.group_size, cfg.bits
        spec.note("awq_lite", f"columns {starts} (x{cfg.group_size}) at int{cfg.bits}")
    return chosen


class AWQLite(Technique):
    name = "awq_lite"
    summary = "Activation-aware saliency picks the top-K 64-column groups of the model; GPTQ codes them at int8."
    Config = AWQLiteConfig
    stage = "export"
    requires = ("gptq",)
    after = ("sandwich_quant", "freq_weighting", "sdclip")
    follows = "#1908 (one int8 group; quantization tax -0.00020 bpb, post-TTT -0.00027, step-matched 3 seeds)"

    def __init__(self, config: AWQLiteConfig | None = None) -> None:
        super().__init__(config)
        self._chosen: dict[str, list[int]] = {}

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        if c.group_top_k <= 0 or c.group_size <= 0 or not 2 <= c.bits <= 8:
            return ["techniques.awq_lite: group_top_k and group_size must be positive and bits in 2-8 "
                    "(#1908: 1, 64, 8)."]
        return []

    def pgolf_on_quant_specs(self, specs: dict[str, QuantSpec], state: dict[str, Tensor], ctx: RunContext) -> None:
        self._chosen = protect(specs, state, ctx.services.calibration_hessians(), self.config)

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        return {"awq_lite_groups": {name: starts for name, starts in self._chosen.items()}}


"""LQER: a low-rank correction of the quantization error on the tensors that lose the most.

PR #1797 (kept by #1855-#2135, `gptq_mixed_quantize`) quantizes every matrix first, then ranks the
quantized matrices by the Frobenius norm of their error ``E = W - dequant(codes)`` and, on the
global top K only, stores a rank-r factorisation of E from its SVD: ``A = U_r·S_r``, ``B = V_rᵀ``.
The asymmetric packing (the records' default) codes A in [-2, 1] with one fp16 scale ``max|A|/1.5``
and B in [-8, 7] with one fp16 scale ``max|B_g|/7.5`` per group of g values along flattened B
(g = 64 in #1855, 32 in #2060/#2135); when B's size is not a multiple of g, or `asym: false`, A and
B are coded symmetrically per row at `factor_bits`. Loading adds ``(qA·sA) @ (qB·sB)`` to the
dequantized matrix. Codes live in int8 containers, as the records store them.

The ranking needs every tensor quantized, so the correction runs in `pgolf_on_quantized`, after
GPTQ (or round to nearest) has written all of them. Candidates are the per-row integer matrices
larger than ``export.keep_float_max_numel``: the matrices the records GPTQ.

Functional core: `low_rank_factors`, `pack_asym`, `pack_sym`, `correction`, `rank_by_error`,
`correct_top_k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from pgolf.api import QuantizedTensor, RunContext, Technique, dequantize, qmax, register_dequantizer, torch_dtype

KIND = "lqer"
PREFIX = "lqer_"
SCALE_FLOOR = 1e-10
Mode = Literal["asym", "sym"]


@dataclass
class LQERConfig:
    rank: int = 4  # LQER_RANK (#1797, #1855, #2135; #2060: 2)
    top_k: int = 3  # LQER_TOP_K (#1855, #2135; #2060: 4)
    group: int = 64  # LQER_ASYM_GROUP (#1855; #2060 and #2135: 32)
    asym: bool = True  # LQER_ASYM_ENABLED
    factor_bits: int = 4  # LQER_FACTOR_BITS: the symmetric per-row width


def low_rank_factors(error: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A = U_r·S_r [rows, r], B = V_rᵀ [r, cols]) of the error's SVD, r = min(rank, its rank bound)."""
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r, :].contiguous()


def pack_asym(a: Tensor, b: Tensor, group: int) -> dict[str, Tensor]:
    """A in [-2, 1] with one scale max|A|/1.5; B in [-8, 7] with a scale max|B_g|/7.5 per group of flattened B."""
    sa = (a.abs().amax().clamp_min(SCALE_FLOOR) / 1.5).to(torch.float16)
    qa = torch.clamp(torch.round(a / sa.float()), -2, 1).to(torch.int8)
    groups = b.reshape(-1, group)
    sb = (groups.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_FLOOR) / 7.5).to(torch.float16).reshape(-1)
    qb = torch.clamp(torch.round(groups / sb.float()[:, None]), -8, 7).to(torch.int8).reshape(b.shape)
    return {"qA": qa, "sA": sa, "qB": qb, "sB": sb}


def pack_sym(a: Tensor, b: Tensor, bits: int) -> dict[str, Tensor]:
    """A and B symmetric per row in [-R, R] (R = 2^(bits-1) - 1), fp16 scales max|row|/R."""
    r = qmax(bits)
    out = {}
    for key, m in (("A", a), ("B", b)):
        s = (m.abs().amax(dim=1).clamp_min(SCALE_FLOOR) / r).to(torch.float16)
        out["q" + key] = torch.clamp(torch.round(m / s.float()[:, None]), -r, r).to(torch.int8)
        out["s" + key] = s
    return out


def correction(parts: dict[str, Tensor], mode: Mode) -> Tensor:
    """The fp32 product the loader adds: (qA·sA) @ (qB·sB)."""
    qa, sa, qb, sb = parts["qA"].float(), parts["sA"].float(), parts["qB"], parts["sB"].float()
    if mode == "asym":
        b = (qb.reshape(sb.numel(), -1).float() * sb[:, None]).reshape(qb.shape)
        return (qa * float(sa)) @ b
    return (qa * sa[:, None]) @ (qb.float() * sb[:, None])


def fit(error: Tensor, cfg: LQERConfig) -> tuple[Mode, dict[str, Tensor]]:
    a, b = low_rank_factors(error, cfg.rank)
    if cfg.asym and b.numel() % cfg.group == 0:
        return "asym", pack_asym(a, b, cfg.group)
    return "sym", pack_sym(a, b, cfg.factor_bits)


def rank_by_error(errors: dict[str, float], top_k: int) -> list[str]:
    """The top-K names by error norm, ties in insertion order (the records' stable sort); zero errors never."""
    return [name for name, e in sorted(errors.items(), key=lambda kv: -kv[1]) if e > 0][:top_k]


def base_weight(qt: QuantizedTensor) -> Tensor:
    """A stored tensor dequantized in fp32, as the records form W_q before subtracting it."""
    return dequantize(QuantizedTensor(qt.kind, qt.shape, "float32", qt.parts, qt.meta))


def correct_top_k(tensors: dict[str, QuantizedTensor], state: dict[str, Tensor], cfg: LQERConfig,
                  min_numel: int) -> dict[str, float]:
    """Replace the top-K candidates of `tensors` by LQER-corrected ones; returns their error norms."""
    errors: dict[str, Tensor] = {}
    norms: dict[str, float] = {}
    for name, qt in tensors.items():
        if qt.kind == "int_rows" and len(qt.shape) == 2 and state[name].numel() > min_numel:
            errors[name] = state[name].float() - base_weight(qt)
            norms[name] = float(errors[name].norm())
    chosen = rank_by_error(norms, cfg.top_k)
    for name in chosen:
        base = tensors[name]
        mode, packed = fit(errors[name], cfg)
        parts = {**base.parts, **{PREFIX + k: v.contiguous() for k, v in packed.items()}}
        tensors[name] = QuantizedTensor(KIND, base.shape, base.dtype, parts,
                                        {**base.meta, "base_kind": base.kind, "lqer": mode})
    return {name: norms[name] for name in chosen}


@register_dequantizer(KIND)
def _dequantize_lqer(qt: QuantizedTensor) -> Tensor:
    base_parts = {k: v for k, v in qt.parts.items() if not k.startswith(PREFIX)}
    meta = {k: v for k, v in qt.meta.items() if k not in ("base_kind", "lqer")}
    w = base_weight(QuantizedTensor(qt.meta["base_kind"], qt.shape, qt.dtype, base_parts, meta))
    factors = {k.removeprefix(PREFIX): v for k, v in qt.parts.items() if k.startswith(PREFIX)}
    return (w + correction(factors, qt.meta["lqer"])).to(torch_dtype(qt.dtype)).contiguous()


class LQER(Technique):
    name = "lqer"
    summary = "Low-rank (SVD) correction of the quantization error on the top-K tensors, INT2/INT4 asymmetric factors."
    Config = LQERConfig
    stage = "export"
    after = ("gptq", "awq_lite", "quant_gate")
    follows = ("#1797/#1855 (rank 4 on the top 3 tensors, asym g64; bundled into #1855's 1.0611), "
               "#2060/#2135 (g32; #2060 rank 2, top 4)")

    def __init__(self, config: LQERConfig | None = None) -> None:
        super().__init__(config)
        self._corrected: dict[str, float] = {}

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        if c.rank <= 0 or c.top_k <= 0 or c.group <= 0 or not 2 <= c.factor_bits <= 8:
            return ["techniques.lqer: rank, top_k and group must be positive and factor_bits in 2-8 "
                    "(the records: rank 4, top_k 3, group 64 or 32, factor_bits 4)."]
        return []

    def pgolf_on_quantized(self, tensors: dict[str, QuantizedTensor], state: dict[str, Tensor],
                           ctx: RunContext) -> None:
        self._corrected = correct_top_k(tensors, state, self.config, ctx.recipe.export.keep_float_max_numel)
        ctx.log("lqer: " + (", ".join(f"{n} (|E| {e:.4g})" for n, e in self._corrected.items()) or "no candidate"))

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        return {"lqer_tensors": list(self._corrected),
                "lqer_error_norms": [round(e, 6) for e in self._corrected.values()]}

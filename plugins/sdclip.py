"""SDClip: per-row quantization scale ``k · std(row) / R`` instead of a clip search or percentile.

PR #1394 replaced the percentile/candidate clip with ``s_r = max(k·σ_r/R, 1e-10)`` (R = 2^(bits-1)-1);
values beyond ``k·σ_r`` clamp to ±R. For Gaussian rows the entropy of the codes is about
``bits - log2 k + const``, so k is first a size knob: larger k, coarser steps, fewer bytes. PR #1586
(via #1626) split k by role: MLP 12, attention 13, embedding 15 (int7), other matrices 12.85.
PR #1412's Hessian-aware variant multiplies each row's clip by ``1 + λ(imp_r - 1)``, where imp_r is
the row's mean |W| weighted by the normalised diagonal of the damped Hessian (λ = 0.175). The
Hessians are the host's calibration Hessians (`ctx.services.calibration_hessians()`), which need a
technique that provides calibration batches (gptq).

Functional core: `tensor_role`, `sdclip_scale`, `hessian_row_factor`, `apply_sdclip` (edit a
QuantSpec), and `search_multiplier`, the byte-target search used by `mode: target`: it scales all
k together until the real artifact (real quantizer, real codec) lands just under the budget; each
probe is the host's own measurement of an export (`ctx.services.measure_export`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn

from pgolf.api import QuantSpec, RunContext, Technique, damped_hessian, default_spec, qmax

SCALE_FLOOR = 1e-10  # the records' floor (the baseline's 1/R floor fixes tiny rows to a coarse step)
Role = Literal["embed", "attn", "mlp", "matrix"]


def tensor_role(name: str) -> Role:
    """Which k a tensor gets, by name as the records select it (tok_emb / .mlp. / .attn. / other)."""
    if name.startswith(("tok_emb.", "lm_head.")):
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name:
        return "attn"
    return "matrix"


def sdclip_scale(w: Tensor, k: float, bits: int, row_factor: Tensor | None = None) -> Tensor:
    """fp32 per-row scales ``max(k · std(row) · factor / R, 1e-10)``."""
    clip = k * w.float().std(dim=1)
    if row_factor is not None:
        clip = clip * row_factor.to(clip)
    return (clip / qmax(bits)).clamp_min(SCALE_FLOOR)


def hessian_row_factor(w: Tensor, hessian_diag: Tensor, lam: float) -> Tensor:
    """PR #1412's per-row clip factor ``1 + λ(row_imp - 1)`` (mean 1 in row_imp, not in the factor).

    ``col_imp = d / mean(d)`` from the damped Hessian diagonal; ``row_imp_r = mean_j |W_rj| col_imp_j``,
    normalised to mean 1. Rows that feed important input directions get a wider clip.
    """
    d = hessian_diag.float()
    col_imp = d / d.mean()
    row_imp = (w.float().abs() * col_imp[None, :]).mean(dim=1)
    row_imp = row_imp / row_imp.mean()
    return 1.0 + lam * (row_imp - 1.0)


def apply_sdclip(spec: QuantSpec, k: float, row_factor: Tensor | None = None, who: str = "sdclip") -> None:
    """Switch a spec to the std-based clip (the host's quantizers and GPTQ read these fields)."""
    spec.clip = "sigmas"
    spec.clip_sigmas = k
    spec.scale_floor = SCALE_FLOOR
    spec.row_scale = row_factor
    spec.note(who, f"k={k:.4g}" + (" hessian-aware" if row_factor is not None else ""))


# --- the byte-target search ------------------------------------------------------------------------


@dataclass
class SearchResult:
    multiplier: float
    bytes: int
    probes: list[tuple[float, int]] = field(default_factory=list)  # (multiplier, bytes) in probe order
    fits: bool = True


def search_multiplier(
    measure: Callable[[float], int],
    target: int,
    tolerance: int,
    lo: float,
    hi: float,
    max_probes: int,
    bytes_per_doubling: float,
) -> SearchResult:
    """Smallest multiplier m in [lo, hi] whose artifact fits, within `tolerance` bytes of `target`.

    Bytes fall about linearly in log2 m (each doubling of k costs about one bit per code, the
    Gaussian entropy law), so the search works on x = log2 m: the first step uses
    `bytes_per_doubling` as the slope, later steps the secant of the two nearest probes, kept
    inside the bracket of (fits, does not fit) once one exists, with bisection as the fallback.
    Typically 2-4 probes; every probe is a real quantization and compression.
    """
    lo_x, hi_x = math.log2(lo), math.log2(hi)
    aim = target - tolerance / 2
    probes: list[tuple[float, int]] = []

    def probe(x: float) -> int:
        b = measure(2.0 ** x)
        probes.append((x, b))
        return b

    x = min(max(0.0, lo_x), hi_x)
    b = probe(x)
    while len(probes) < max_probes:
        fit = [(px, pb) for px, pb in probes if pb <= target]
        over = [(px, pb) for px, pb in probes if pb > target]
        best_fit = min(fit, key=lambda p: p[0]) if fit else None  # smallest k that fits = most bytes
        worst_over = max(over, key=lambda p: p[0]) if over else None  # largest k that still does not fit
        if best_fit is not None and best_fit[1] >= target - tolerance:
            break
        if best_fit is not None and best_fit[0] <= lo_x:
            break  # even the finest allowed clip fits
        if best_fit is None and worst_over is not None and worst_over[0] >= hi_x:
            break  # even the coarsest allowed clip does not fit
        near = sorted(probes, key=lambda p: abs(p[1] - aim))[:2]
        if len(near) == 2 and near[0][0] != near[1][0] and near[0][1] != near[1][1]:
            slope = (near[0][1] - near[1][1]) / (near[0][0] - near[1][0])  # bytes per unit log2 m (negative)
        else:
            slope = -bytes_per_doubling
        x, b = near[0]
        step = (aim - b) / slope if slope < 0 else (1.0 if b > aim else -1.0)
        new_x = min(max(x + step, lo_x), hi_x)
        if best_fit is not None and worst_over is not None:
            left, right = worst_over[0], best_fit[0]
            if not left < new_x < right:
                new_x = (left + right) / 2
        if any(abs(new_x - px) < 1e-6 for px, _ in probes):
            break
        probe(new_x)
    fit = [(px, pb) for px, pb in probes if pb <= target]
    if fit:
        x, b = min(fit, key=lambda p: p[0])
        return SearchResult(2.0 ** x, b, [(2.0 ** px, pb) for px, pb in probes], True)
    x, b = min(probes, key=lambda p: p[1])
    return SearchResult(2.0 ** x, b, [(2.0 ** px, pb) for px, pb in probes], False)


# --- the plugin ------------------------------------------------------------------------------------


@dataclass
class SDClipConfig:
    mlp_sigmas: float = 12.0  # #1626 (MLP_CLIP_SIGMAS=12 in its run command)
    attn_sigmas: float = 13.0  # #1626
    matrix_sigmas: float = 12.85  # #1394, kept by #1626 for other matrices
    embed_sigmas: float = 15.0  # #1626 at int7 (#1394: 20 at int8)
    hessian_lambda: float = 0.0  # #1412 used 0.175 (needs calibration Hessians: gptq); #1626 onwards dropped it
    hessian_damp: float = 0.01  # damping of the Hessian diagonal for hessian_lambda (gptq's default damp)
    mode: Literal["fixed", "target"] = "fixed"  # target: scale every k to land just under the byte budget
    target_bytes: int | None = None  # None = export.budget_bytes - target_margin_bytes
    target_margin_bytes: int = 4096  # room for the artifact's metadata header, which probes leave out
    target_tolerance_bytes: int = 20_000  # stop once this close under the target
    target_min_multiplier: float = 0.5
    target_max_multiplier: float = 4.0
    target_max_probes: int = 8


class SDClip(Technique):
    """SDClip (see the module docstring).

    ``hessian_lambda > 0`` reads the host's calibration Hessians, damped by ``hessian_damp``
    (default 0.01, the same as gptq's ``damp``; set both when changing one to keep the numbers of a
    run where sdclip read gptq's own setting).
    """

    name = "sdclip"
    summary = "Per-row scale k*std(row)/R with k per role (attn, MLP, other, embedding); optional byte-target k."
    Config = SDClipConfig
    stage = "export"
    after = ("sandwich_quant", "freq_weighting")
    before = ("gptq",)
    follows = "#1394 (SDClip, k 12.85 / emb 20), #1626 (MLP 12, attn 13, emb 15 at int7), #1412 (Hessian-aware, λ 0.175)"

    def __init__(self, config: SDClipConfig | None = None) -> None:
        super().__init__(config)
        self._state: dict[str, Tensor] = {}
        self._multiplier = 1.0
        self._searched = False
        self._search: SearchResult | None = None
        self._search_seconds = 0.0

    def k_for(self, name: str) -> float:
        c = self.config
        return {"embed": c.embed_sigmas, "attn": c.attn_sigmas, "mlp": c.mlp_sigmas,
                "matrix": c.matrix_sigmas}[tensor_role(name)]

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c, problems = self.config, []
        if min(c.mlp_sigmas, c.attn_sigmas, c.matrix_sigmas, c.embed_sigmas) <= 0:
            problems.append("techniques.sdclip: every *_sigmas must be positive (the records use 12-20).")
        if not 0.0 <= c.hessian_lambda < 1.0:
            problems.append("techniques.sdclip: hessian_lambda must lie in [0, 1) (#1412 used 0.175).")
        if c.hessian_lambda > 0 and "gptq" not in ctx.recipe.techniques:
            problems.append("techniques.sdclip: hessian_lambda > 0 weights rows by the calibration Hessians, which "
                            "need a technique that provides calibration batches; enable gptq or set "
                            "hessian_lambda: 0.")
        if c.hessian_damp <= 0:
            problems.append("techniques.sdclip: hessian_damp must be positive (gptq's default is 0.01).")
        if not 0 < c.target_min_multiplier <= 1.0 <= c.target_max_multiplier or c.target_max_probes < 1:
            problems.append("techniques.sdclip: need 0 < target_min_multiplier <= 1 <= target_max_multiplier "
                            "and target_max_probes >= 1.")
        return problems

    def pgolf_on_export_start(self, model: nn.Module, ctx: RunContext) -> None:
        """A target search quantizes the whole state several times, so it keeps a CPU copy."""
        self._multiplier, self._searched, self._search = 1.0, False, None
        if self.config.mode == "target":
            self._state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}

    def pgolf_on_quant_spec(self, name: str, tensor: Tensor, spec: QuantSpec, ctx: RunContext) -> None:
        if spec.scheme != "int" or tensor.ndim != 2:
            return
        if self.config.mode == "target" and not self._searched:
            self._searched = True  # the search re-enters this hook for every tensor
            self._run_search(ctx)
        factor = None
        if self.config.hessian_lambda > 0:
            factor = self._row_factor(name, tensor, ctx)
        apply_sdclip(spec, self.k_for(name) * self._multiplier, factor)

    def _row_factor(self, name: str, tensor: Tensor, ctx: RunContext) -> Tensor | None:
        hessian = ctx.services.calibration_hessians().get(name)
        if hessian is None:
            return None
        diag = damped_hessian(hessian, self.config.hessian_damp)[0].diagonal().cpu()
        return hessian_row_factor(tensor, diag, self.config.hessian_lambda)

    def target_bytes(self, ctx: RunContext) -> int:
        c = self.config
        return c.target_bytes if c.target_bytes is not None else ctx.recipe.export.budget_bytes - c.target_margin_bytes

    def _run_search(self, ctx: RunContext) -> None:
        start = time.perf_counter()
        export = ctx.recipe.export
        codes = sum(t.numel() for name, t in self._state.items()
                    if t.ndim == 2 and default_spec(name, t, export).scheme == "int")

        def measure(multiplier: float) -> int:
            self._multiplier = multiplier  # the host's measurement re-enters pgolf_on_quant_spec
            total = ctx.services.measure_export(self._state)
            ctx.log(f"sdclip: k x {multiplier:.4f} -> {total:,} bytes")
            return total

        c = self.config
        result = search_multiplier(measure, self.target_bytes(ctx), c.target_tolerance_bytes, c.target_min_multiplier,
                                   c.target_max_multiplier, c.target_max_probes, max(codes, 1) / 8.0)
        self._multiplier = result.multiplier
        self._search = result
        self._search_seconds = time.perf_counter() - start
        verdict = "fits" if result.fits else "does NOT fit"
        ctx.log(f"sdclip: target {self.target_bytes(ctx):,} bytes -> k x {result.multiplier:.4f}, "
                f"{result.bytes:,} bytes ({verdict}) after {len(result.probes)} probes in {self._search_seconds:.1f}s")

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        out: dict[str, Any] = {"sdclip_multiplier": self._multiplier}
        if self._search is not None:
            out.update(sdclip_target_bytes=self.target_bytes(ctx), sdclip_search_bytes=self._search.bytes,
                       sdclip_search_fits=self._search.fits, sdclip_probes=self._search.probes,
                       sdclip_search_seconds=round(self._search_seconds, 3))
        return out

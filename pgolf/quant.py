"""Per-tensor quantization specs, round-to-nearest quantization and dequantization.

The host default reproduces the challenge baseline exactly (train_gpt.py
`quantize_state_dict_int8`): non-float tensors pass through; float tensors with at most 65,536
elements pass through (control tensors in fp32, others in fp16); 2-D tensors get int8 per row
with a 99.99984th-percentile clip and scale ``max(clip/127, 1/127)`` stored in fp16; other
tensors get one int8 scale. The records from #1530 on (`gptq_mixed_quantize`) store every small
float tensor in fp16, control tensors included: ``export.keep_control_fp32: false``;
``export.small_float_dtype: fp32`` keeps all of them in full precision instead.
Techniques change a tensor's `QuantSpec` (bits, clip, row groups, a wider column group)
through `pgolf_on_quant_spec` (or see every spec at once in `pgolf_on_quant_specs`), replace
the quantizer through `pgolf_quantize_tensor`, or revise the quantized tensors together in
`pgolf_on_quantized`. Every integer code is stored in an int8 container; narrower widths only
shrink the artifact through the entropy coder (or a technique's packing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from pgolf.model import CONTROL_TENSOR_NAME_PATTERNS
from pgolf.recipe import ExportConfig

Scheme = Literal["int", "fp16", "fp32", "raw"]


def qmax(bits: int) -> int:
    """Largest code of a symmetric `bits`-bit range [-R, R]: int5 15, int6 31, int7 63, int8 127."""
    return 2 ** (bits - 1) - 1


@dataclass
class QuantSpec:
    """How one tensor is stored. Techniques edit it in place; `notes` says who changed what."""

    scheme: Scheme
    bits: int = 8
    clip: Literal["percentile", "sigmas", "none"] = "percentile"
    clip_percentile: float = 99.99984
    clip_sigmas: float = 0.0  # SDClip: per-row scale = clip_sigmas * std(row) / R
    scale_floor: float | None = None  # None = the baseline's 1/R floor
    row_scale: Tensor | None = None  # optional per-row factor on the clip (Hessian-aware SDClip)
    row_groups: list[tuple[Tensor, int]] = field(default_factory=list)  # (row indices, bits) exceptions
    # Column groups [start, start + col_group_size) coded at col_group_bits, with a second per-row scale
    # from the same clip (AWQ-lite, #1908).
    col_groups: list[int] = field(default_factory=list)
    col_group_size: int = 0
    col_group_bits: int = 8
    # Round against the stored fp16 scale (the records' GPTQ and gate paths) rather than the fp32 one (baseline).
    fp16_scale: bool = False
    notes: list[str] = field(default_factory=list)

    def note(self, who: str, what: str) -> None:
        self.notes.append(f"{who}: {what}")


@dataclass
class QuantizedTensor:
    """A stored tensor: integer codes and scales (or a passthrough copy) plus how to rebuild it."""

    kind: str  # key of the dequantizer: "raw", "float", "int_rows", "int_tensor", or a technique's own
    shape: tuple[int, ...]
    dtype: str  # original dtype name, restored on load
    parts: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


Dequantizer = Callable[[QuantizedTensor], Tensor]
DEQUANTIZERS: dict[str, Dequantizer] = {}


def register_dequantizer(kind: str) -> Callable[[Dequantizer], Dequantizer]:
    """Techniques that store tensors their own way register how to rebuild them."""

    def deco(fn: Dequantizer) -> Dequantizer:
        DEQUANTIZERS[kind] = fn
        return fn

    return deco


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def default_spec(name: str, tensor: Tensor, cfg: ExportConfig) -> QuantSpec:
    if not tensor.is_floating_point():
        return QuantSpec("raw")
    if tensor.numel() <= cfg.keep_float_max_numel:
        is_control = any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS)
        return QuantSpec("fp32" if cfg.small_float_dtype == "fp32" or (is_control and cfg.keep_control_fp32)
                         else "fp16")
    return QuantSpec("int", bits=8, clip="percentile", clip_percentile=cfg.clip_percentile)


def row_clip(t32: Tensor, spec: QuantSpec) -> Tensor:
    """Per-row clip values: percentile of |w| (baseline), k standard deviations (SDClip) or max."""
    if spec.clip == "percentile":
        clip = torch.quantile(t32.abs(), spec.clip_percentile / 100.0, dim=1)
    elif spec.clip == "sigmas":
        clip = spec.clip_sigmas * t32.std(dim=1)
    else:
        clip = t32.abs().amax(dim=1)
    if spec.row_scale is not None:
        clip = clip * spec.row_scale.to(clip)
    return clip


def scales_from_clip(clip: Tensor, spec: QuantSpec, bits: int) -> Tensor:
    """fp32 per-row scales; the baseline floors at 1/R (SDClip specs set a 1e-10 floor)."""
    r = qmax(bits)
    floor = spec.scale_floor if spec.scale_floor is not None else 1.0 / r
    return (clip / r).clamp_min(floor)


def quantize_rows(t32: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Round to nearest with per-row scales; codes clamp to [-R, R]."""
    r = qmax(bits)
    return torch.clamp(torch.round(t32 / scale[:, None]), -r, r).to(torch.int8)


def row_bits(spec: QuantSpec, rows: int) -> Tensor:
    """Bits per row: the spec's width, with its row-group exceptions."""
    bits = torch.full((rows,), spec.bits, dtype=torch.int64)
    for idx, group_bits in spec.row_groups:
        bits[idx] = group_bits
    return bits


def spec_row_scales(w32: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(fp32 scale, bits, clip) per row: the spec's clip rule, width and row-group exceptions."""
    clip = row_clip(w32, spec)
    bits = row_bits(spec, w32.shape[0])
    scale = torch.empty(w32.shape[0], dtype=torch.float32)
    for b in torch.unique(bits).tolist():
        rows = bits == b
        scale[rows] = scales_from_clip(clip[rows], spec, int(b))
    return scale, bits, clip


def col_group_mask(cols: int, spec: QuantSpec) -> Tensor:
    """Which columns the spec's wider column groups cover."""
    mask = torch.zeros(cols, dtype=torch.bool)
    for start in spec.col_groups:
        mask[start : start + spec.col_group_size] = True
    return mask


def round_codes(x: Tensor, scale: Tensor, r: Tensor | float) -> Tensor:
    """Round to nearest with per-row scales, codes clamped to ±r; a zero scale gives code 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    q = torch.round(x / safe)
    q = torch.clamp(q, -r, r) if isinstance(r, float) else torch.maximum(torch.minimum(q, r), -r)
    return torch.where(scale[:, None] > 0, q, torch.zeros_like(q)).to(torch.int8)


def int_rows_tensor(t: Tensor, q: Tensor, scale16: Tensor, bits: Tensor, spec: QuantSpec,
                    col_scale16: Tensor | None = None, **meta: Any) -> QuantizedTensor:
    """The stored form of a per-row quantized matrix (round to nearest and GPTQ write the same)."""
    parts = {"q": q.contiguous(), "scale": scale16.contiguous()}
    info: dict[str, Any] = {"bits": spec.bits, **meta}
    if spec.row_groups:
        parts["row_bits"] = bits.to(torch.int8)
    if spec.col_groups and col_scale16 is not None:
        parts["col_start"] = torch.tensor(spec.col_groups, dtype=torch.int16)  # the record's layout (#1908)
        parts["col_scale"] = col_scale16.contiguous()
        info.update(col_group_size=spec.col_group_size, col_group_bits=spec.col_group_bits)
    return QuantizedTensor("int_rows", tuple(t.shape), dtype_name(t.dtype), parts, info)


def quantize_rtn(name: str, tensor: Tensor, spec: QuantSpec) -> QuantizedTensor:
    """The host quantizer: passthrough or round-to-nearest per the spec."""
    t = tensor.detach().to("cpu").contiguous()
    shape, dtype = tuple(t.shape), dtype_name(t.dtype)
    if spec.scheme == "raw":
        return QuantizedTensor("raw", shape, dtype, {"data": t})
    if spec.scheme in ("fp16", "fp32"):
        store = torch.float16 if spec.scheme == "fp16" else torch.float32
        return QuantizedTensor("float", shape, dtype, {"data": t.to(store).contiguous()})
    t32 = t.float()
    if t32.ndim == 2:
        scale, bits, clip = spec_row_scales(t32, spec)
        scale16 = scale.to(torch.float16)
        src = t32 if spec.clip == "none" else torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None])
        r = (2 ** (bits - 1) - 1).to(torch.float32)[:, None]
        q = round_codes(src, scale16.float() if spec.fp16_scale else scale, r)
        col_scale16 = None
        if spec.col_groups:
            col_scale = scales_from_clip(clip, spec, spec.col_group_bits)
            col_scale16 = col_scale.to(torch.float16)
            cols = col_group_mask(t32.shape[1], spec)
            q[:, cols] = round_codes(src[:, cols], col_scale16.float() if spec.fp16_scale else col_scale,
                                     float(qmax(spec.col_group_bits)))
        return int_rows_tensor(t, q, scale16, bits, spec, col_scale16)
    flat = t32.flatten()
    clip = float(torch.quantile(flat.abs(), spec.clip_percentile / 100.0).item()) if flat.numel() else 0.0
    r = qmax(spec.bits)
    s = clip / r if clip > 0 else 1.0
    q = torch.clamp(torch.round(torch.clamp(t32, -clip, clip) / s), -r, r).to(torch.int8)
    return QuantizedTensor("int_tensor", shape, dtype, {"q": q.contiguous(), "scale": torch.tensor([s], dtype=torch.float32)},
                           {"bits": spec.bits})


@register_dequantizer("raw")
def _dq_raw(qt: QuantizedTensor) -> Tensor:
    return qt.parts["data"]


@register_dequantizer("float")
def _dq_float(qt: QuantizedTensor) -> Tensor:
    return qt.parts["data"].to(torch_dtype(qt.dtype))


@register_dequantizer("int_rows")
def _dq_rows(qt: QuantizedTensor) -> Tensor:
    q, s = qt.parts["q"], qt.parts["scale"].to(torch.float32)
    w = q.float() * s.view(q.shape[0], *([1] * (q.ndim - 1)))
    if "col_scale" in qt.parts:
        size, hi = int(qt.meta["col_group_size"]), qt.parts["col_scale"].float()[:, None]
        for start in qt.parts["col_start"].tolist():
            w[:, start : start + size] = q[:, start : start + size].float() * hi
    return w.to(torch_dtype(qt.dtype)).contiguous()


@register_dequantizer("int_tensor")
def _dq_tensor(qt: QuantizedTensor) -> Tensor:
    return (qt.parts["q"].float() * float(qt.parts["scale"].item())).to(torch_dtype(qt.dtype)).contiguous()


def dequantize(qt: QuantizedTensor) -> Tensor:
    try:
        fn = DEQUANTIZERS[qt.kind]
    except KeyError:
        raise ValueError(f"no dequantizer for tensor kind {qt.kind!r}; is the technique that wrote it installed?") from None
    return fn(qt).reshape(qt.shape)

"""Per-tensor quantization specs, round-to-nearest quantization and dequantization.

The host default reproduces the challenge baseline exactly (train_gpt.py
`quantize_state_dict_int8`): non-float tensors pass through; float tensors with at most 65,536
elements pass through (control tensors in fp32, others in fp16); 2-D tensors get int8 per row
with a 99.99984th-percentile clip and scale ``max(clip/127, 1/127)`` stored in fp16; other
tensors get one int8 scale. Techniques change a tensor's `QuantSpec` (bits, clip, row groups)
through `pgolf_on_quant_spec`, or replace the quantizer through `pgolf_quantize_tensor`.
Every integer code is stored in an int8 container; narrower widths only shrink the artifact
through the entropy coder (or a technique's packing).
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
        return QuantSpec("fp32" if is_control else "fp16")
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
        clip = row_clip(t32, spec)
        bits = row_bits(spec, t32.shape[0])
        scale = torch.empty(t32.shape[0], dtype=torch.float32)
        q = torch.empty(t32.shape, dtype=torch.int8)
        for b in torch.unique(bits).tolist():
            rows = (bits == b).nonzero().squeeze(1)
            s = scales_from_clip(clip[rows], spec, int(b))
            sub = t32[rows]
            if spec.clip != "none":
                c = clip[rows][:, None]
                sub = torch.maximum(torch.minimum(sub, c), -c)
            q[rows] = quantize_rows(sub, s, int(b))
            scale[rows] = s
        parts = {"q": q.contiguous(), "scale": scale.to(torch.float16).contiguous()}
        if spec.row_groups:
            parts["row_bits"] = bits.to(torch.int8)
        return QuantizedTensor("int_rows", shape, dtype, parts, {"bits": spec.bits})
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
    return (q.float() * s.view(q.shape[0], *([1] * (q.ndim - 1)))).to(torch_dtype(qt.dtype)).contiguous()


@register_dequantizer("int_tensor")
def _dq_tensor(qt: QuantizedTensor) -> Tensor:
    return (qt.parts["q"].float() * float(qt.parts["scale"].item())).to(torch_dtype(qt.dtype)).contiguous()


def dequantize(qt: QuantizedTensor) -> Tensor:
    try:
        fn = DEQUANTIZERS[qt.kind]
    except KeyError:
        raise ValueError(f"no dequantizer for tensor kind {qt.kind!r}; is the technique that wrote it installed?") from None
    return fn(qt).reshape(qt.shape)

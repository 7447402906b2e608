"""QuantGate: attention-gate weights stored int8 per row instead of passing through in fp16.

PR #1736 (`GATED_ATTN_QUANT_GATE=1`, kept by #1787-#2135) routes every 2-D float tensor whose name
ends in ``.attn_gate_w`` and whose size is in [1024, 8192] (#1855 widened the lower bound to 32
so the sparse gate's 8 x 12 weights qualify too) to symmetric int8 per row: scale
``max|row| / 127`` stored in fp16, codes ``round(W / scale)`` against that fp16 scale, clamped to
±127, before the small-tensor fp16 passthrough and without GPTQ. It halves the gates' raw bytes
(#1736: it "recovers the ~15-40 KB of artifact overhead" of its new tensors).

The technique only rewrites the spec (`gate_spec`); the host's round to nearest quantizes it and
the host's per-row dequantizer restores it. The gates are plain parameters, not linear layers, so
the calibration pass collects no Hessian for them and GPTQ leaves them to round to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from pgolf.api import QuantSpec, RunContext, Technique

RECORD_CLIP_FLOOR = 1e-10  # the record clamps max|row| at 1e-10 before dividing by 127


@dataclass
class QuantGateConfig:
    suffixes: list[str] = field(default_factory=lambda: [".attn_gate_w"])  # the records' gate name
    min_numel: int = 32  # #1855 (#1736: 1024, dense gates only)
    max_numel: int = 8192  # #1736
    bits: int = 8  # #1736: int8 per row


def is_gate(name: str, tensor: Tensor, cfg: QuantGateConfig) -> bool:
    return (tensor.is_floating_point() and tensor.ndim == 2 and name.endswith(tuple(cfg.suffixes))
            and cfg.min_numel <= tensor.numel() <= cfg.max_numel)


def gate_spec(spec: QuantSpec, bits: int = 8) -> None:
    """Rewrite a spec to the records' gate rule: max-abs per row, fp16 scale, no GPTQ-style extras."""
    spec.scheme, spec.bits, spec.clip = "int", bits, "none"
    spec.scale_floor = RECORD_CLIP_FLOOR / (2 ** (bits - 1) - 1)
    spec.fp16_scale = True
    spec.row_scale, spec.row_groups, spec.col_groups = None, [], []
    spec.note("quant_gate", f"int{bits} per row, max-abs scale")


class QuantGate(Technique):
    name = "quant_gate"
    summary = "Attention-gate weights (attn_gate_w) stored int8 per row with fp16 scales instead of fp16."
    Config = QuantGateConfig
    stage = "export"
    after = ("sandwich_quant", "freq_weighting", "sdclip")
    follows = "#1736 GATED_ATTN_QUANT_GATE (recovers ~15-40 KB), kept by #1787-#2135; #1855 widened it to sparse gates"

    def __init__(self, config: QuantGateConfig | None = None) -> None:
        super().__init__(config)
        self._gates: list[str] = []

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c = self.config
        if not c.suffixes or not 0 < c.min_numel <= c.max_numel or not 2 <= c.bits <= 8:
            return ["techniques.quant_gate: suffixes must name at least one tensor suffix, 0 < min_numel <= "
                    "max_numel, and bits in 2-8 (#1855: ['.attn_gate_w'], 32, 8192, 8)."]
        return []

    def pgolf_on_export_start(self, model: Any, ctx: RunContext) -> None:
        self._gates = []

    def pgolf_on_quant_spec(self, name: str, tensor: Tensor, spec: QuantSpec, ctx: RunContext) -> None:
        if is_gate(name, tensor, self.config):
            gate_spec(spec, self.config.bits)
            if name not in self._gates:
                self._gates.append(name)

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        return {"quant_gate_tensors": list(self._gates)}

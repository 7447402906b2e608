"""The records' three attention output gates; each scales every head's output before `proj`.

All three read the attention's input (the block input after `attn_norm` and the layer-norm
scale), multiply y [B, T, H, D] after XSA, and run on every path through attention (training,
evaluation, sliding windows, both kinds of test-time training), because they live in the
attention module's own forward (`pgolf.model.head_gate`). They are mutually exclusive, as in
the records' code (one error names both when two are enabled). Their weights are scalar-AdamW
parameters kept float (`attn_gate_w` and `attn_gate_proj` are in the records' control patterns).

* ``sparse_attn_gate`` (#1787, modded-nanogpt): ``sigmoid(scale * W . x[:12])`` per head,
  ``attn_gate_w`` [heads, 12] zero at init, so every head starts at one half.
* ``attn_out_gate`` (#1667): ``2 * sigmoid(W . src[:12])``, ``attn_gate_proj.weight`` [heads, 12]
  zero at init (identity); `src` is the attention input (``proj``) or its q projection (``q``).
* ``gated_attn`` (#1736, Qwen's G1, arXiv:2505.06708): ``sigmoid(W . x)`` with ``attn_gate_w``
  [heads, model_dim] drawn from N(0, init_std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgolf.api import ModelConfig, RunContext, Technique


def use_attn_gate(model: ModelConfig, kind: Literal["sparse", "output", "dense"], *, window: int = 12,
                  src: Literal["proj", "q"] = "proj", scale: float = 1.0, init_std: float = 0.0) -> None:
    """Gate every head's attention output (before `proj`) with the gate of the given kind."""
    model.attn_gate = kind
    model.attn_gate_window = window
    model.attn_gate_src = src
    model.attn_gate_scale = scale
    model.attn_gate_init_std = init_std


def gate_problems(model: ModelConfig) -> list[str]:
    """The model's own checks on the gate fields, once a technique has set them."""
    return [message for key, message in model.validate() if key.startswith("attn_gate")]


class AttnGate(Technique):
    """Shared wiring: each gate configures the model and checks the result."""

    stage = "train"

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str] | None:
        return gate_problems(ctx.recipe.model) or None


@dataclass
class SparseAttnGateConfig:
    gate_window: int = 12  # GATE_WINDOW (#1787, #1855)
    scale: float = 0.5  # SPARSE_ATTN_GATE_SCALE: 0.5 in #1855 and later (1908-2135 logs); #1787 and #1868 ran 1.0
    init_std: float = 0.0  # SPARSE_ATTN_GATE_INIT_STD: 0 = zeros, every head at sigmoid(0) = 0.5

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.gate_window < 1:
            problems.append(("gate_window", f"gate_window must be at least 1, got {self.gate_window}"))
        if self.init_std < 0:
            problems.append(("init_std", f"init_std must be >= 0, got {self.init_std}"))
        return problems


class SparseAttnGate(AttnGate):
    name = "sparse_attn_gate"
    summary = "per-head attention output gate sigmoid(scale * W . x[:12]), W zero at init"
    Config = SparseAttnGateConfig
    conflicts = ("attn_out_gate", "gated_attn")
    follows = ("#1787 (replaces #1736's dense gate: '~44 KB artifact with no measurable BPB cost'; bundled 1.06335); "
               "scale 0.5 from #1855 (one of its 9 retuned values) to #2135")

    def pgolf_configure(self, ctx: RunContext) -> None:
        c = self.config
        use_attn_gate(ctx.recipe.model, "sparse", window=c.gate_window, scale=c.scale, init_std=c.init_std)


@dataclass
class AttnOutGateConfig:
    gate_window: int = 12  # GATE_WIDTH (#1667)
    src: Literal["proj", "q"] = "proj"  # GATE_ATTN_SRC: #1667 ran proj (the attention's input)

    def validate(self) -> tuple[str, str] | None:
        if self.gate_window < 1:
            return "gate_window", f"gate_window must be at least 1, got {self.gate_window}"
        return None


class AttnOutGate(AttnGate):
    name = "attn_out_gate"
    summary = "per-head attention output gate 2 * sigmoid(W . src[:12]), identity at init"
    Config = AttnOutGateConfig
    conflicts = ("sparse_attn_gate", "gated_attn")
    follows = "#1667 AttnOutGate, 1,056 parameters (bundled with SmearGate, 1.07139; '~1.5% of step throughput')"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_attn_gate(ctx.recipe.model, "output", window=self.config.gate_window, src=self.config.src)


@dataclass
class GatedAttnConfig:
    init_std: float = 0.005  # GATED_ATTN_INIT_STD=0.005 in #1736's run (README, logs); its code default was 0.01

    def validate(self) -> tuple[str, str] | None:
        if self.init_std < 0:
            return "init_std", f"init_std must be >= 0, got {self.init_std}"
        return None


class GatedAttn(AttnGate):
    name = "gated_attn"
    summary = "dense per-head attention output gate sigmoid(W . x), W ~ N(0, 0.005)"
    Config = GatedAttnConfig
    conflicts = ("sparse_attn_gate", "attn_out_gate")
    follows = "#1736 GatedAttn (bundled with CaseOps, quant gate, loop 4-5 and phased TTT: 1.06549, -0.00644 vs #1626)"

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_attn_gate(ctx.recipe.model, "dense", init_std=self.config.init_std)

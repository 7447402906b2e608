"""The plugin API: the one pgolf module a technique imports.

Everything a technique needs is here: the `Technique` base and `hookimpl`, the stage names, the
run context a hook receives, every type a hook passes (windows, scores, the scorer protocol,
quantization spec and quantized tensor, text transform, warmup phase) and the host's functional
helpers that techniques build on (quantization rules, byte accounting, the model's modules).
The rest of `pgolf/` is the host's own business and may change without notice; the names
below are the stable surface. A test keeps built-in and example techniques to this module.

A technique, in full::

    from dataclasses import dataclass
    from pgolf.api import RunContext, Technique

    @dataclass
    class HalfLRConfig:
        factor: float = 0.5

    class HalfLR(Technique):
        name = "half_lr"
        summary = "scale every learning rate"
        Config = HalfLRConfig
        stage = "train"

        def pgolf_configure(self, ctx: RunContext) -> None:
            ctx.recipe.optim.matrix_lr *= self.config.factor
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pluggy

from pgolf.calibration import HessianCollector, collect_hessians, damped_hessian
from pgolf.codecs import CODER_INSTALL, coder_available, resolve_coder
from pgolf.context import (
    DataView,
    Distributed,
    HostServices,
    MetricsLog,
    RunContext,
    Stash,
    StashKey,
    TrainClock,
    WarmupPhase,
)
from pgolf.data.bpb import LEADING_SPACE, build_byte_tables, loss_and_bpb
from pgolf.data.shards import VAL_BYTES_GLOB, list_shards
from pgolf.data.textdata import TextTransform, read_manifest
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import ConfigError, DataError, PgolfError
from pgolf.loop import grad_accum_steps
from pgolf.model import GPT, Block
from pgolf.quant import (
    QuantizedTensor,
    QuantSpec,
    col_group_mask,
    default_spec,
    dequantize,
    dtype_name,
    int_rows_tensor,
    qmax,
    quantize_rtn,
    register_dequantizer,
    round_codes,
    row_bits,
    row_clip,
    scales_from_clip,
    spec_row_scales,
    torch_dtype,
)
from pgolf.recipe import DataConfig, EvalConfig, ExportConfig, ModelConfig, OptimConfig, Recipe, TrainConfig
from pgolf.scores import (
    EvalWindows,
    GateCounts,
    Scorer,
    TokenScores,
    WindowScorer,
    batches,
    plain_windows,
    rank_share,
    score_batch,
)

PROJECT = "pgolf"
hookimpl = pluggy.HookimplMarker(PROJECT)

Stage = Literal["train", "export", "eval"]
STAGES: tuple[Stage, ...] = ("train", "export", "eval")


@dataclass
class NoConfig:
    """For techniques without parameters."""


class Technique:
    """Base class for techniques: static metadata plus hook implementations.

    Subclasses set the class attributes and implement ``pgolf_*`` methods (any method with
    that prefix is a hook implementation; ``@hookimpl(...)`` adds options such as
    ``wrapper=True``). ``stage`` is the earliest lifecycle stage the technique changes: it
    decides which cached outputs an ablation may reuse when the technique is toggled, and which
    of its hooks must fire for a run to count it as having acted.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    stage: ClassVar[Stage] = "train"
    requires: ClassVar[tuple[str, ...]] = ()
    conflicts: ClassVar[tuple[str, ...]] = ()
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    follows: ClassVar[str] = ""  # the challenge records (PRs) it follows, with their reported effects

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def stage_for(self) -> Stage:
        """The stage this configured instance changes (override when it depends on config)."""
        return self.stage

    @classmethod
    def hook_names(cls) -> list[str]:
        return sorted(n for n, v in inspect.getmembers(cls) if n.startswith("pgolf_") and callable(v))


__all__ = [
    "GPT", "LEADING_SPACE", "PROJECT", "STAGES", "VAL_BYTES_GLOB", "Block", "ConfigError", "DataConfig", "DataError",
    "DataView", "Distributed", "EvalConfig", "EvalWindows", "ExportConfig", "GateCounts", "HessianCollector", "HostServices",
    "MetricsLog", "ModelConfig", "NoConfig", "OptimConfig", "PgolfError", "QuantSpec", "QuantizedTensor", "Recipe",
    "RunContext", "Scorer", "Stage", "Stash", "StashKey", "Technique", "TextTransform", "TokenScores", "TrainClock",
    "TrainConfig", "WarmupPhase", "WindowScorer", "batches", "build_byte_tables", "collect_hessians",
    "col_group_mask", "damped_hessian", "default_spec", "dequantize", "dtype_name", "grad_accum_steps", "hookimpl", "int_rows_tensor",
    "list_shards", "load_tokenizer", "loss_and_bpb", "plain_windows", "qmax", "quantize_rtn", "rank_share",
    "read_manifest", "register_dequantizer", "round_codes", "row_bits", "row_clip", "scales_from_clip", "score_batch",
    "spec_row_scales", "torch_dtype", "CODER_INSTALL", "coder_available", "resolve_coder",
]

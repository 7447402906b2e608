"""The host's defaults, as an ordinary plugin registered with ``trylast=True``.

With no technique enabled these implementations run the challenge baseline: its GPT, its
Muon + Adam split, round-to-nearest int8 export, and non-overlapping window scoring. A
technique overrides one by returning a value from the same hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pgolf.api import hookimpl
from pgolf.context import RunContext
from pgolf.model import build_model
from pgolf.optim import build_optimizers
from pgolf.quant import QuantizedTensor, QuantSpec, quantize_rtn
from pgolf.scores import EvalWindows, WindowScorer, plain_windows


class HostDefaults:
    @hookimpl(trylast=True)
    def pgolf_provide_model(self, ctx: RunContext) -> nn.Module:
        return build_model(ctx.recipe.model, bos_id=ctx.data.bos_id)

    @hookimpl(trylast=True)
    def pgolf_provide_optimizers(self, model: nn.Module, ctx: RunContext) -> list[Any]:
        return build_optimizers(model, ctx.recipe.optim, ctx.recipe.model.tie_embeddings)

    @hookimpl(trylast=True)
    def pgolf_quantize_tensor(self, name: str, tensor: torch.Tensor, spec: QuantSpec, ctx: RunContext) -> QuantizedTensor:
        return quantize_rtn(name, tensor, spec)

    @hookimpl(trylast=True)
    def pgolf_provide_eval_windows(self, ctx: RunContext, num_tokens: int) -> EvalWindows:
        return plain_windows(num_tokens, ctx.recipe.eval_seq_len)

    @hookimpl(trylast=True)
    def pgolf_provide_scorer(self, ctx: RunContext) -> WindowScorer:
        return WindowScorer()

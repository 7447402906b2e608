"""Techniques for the ablation tests, one per stage, named in recipes as "tests.ablation_techniques:Class".

They live outside the test modules so worker processes and CLI subprocesses import them
without pytest's conftest (which would point the data cache elsewhere). Like every technique they
import only `pgolf.api`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.api import EvalWindows, Technique, plain_windows

MODULE = "tests.ablation_techniques"


@dataclass
class ShrinkConfig:
    factor: float = 0.99


class Shrink(Technique):
    """Train stage: scales every weight after training (changes the checkpoint)."""

    name = "shrink"
    summary = "test technique: scale the trained weights"
    Config = ShrinkConfig
    stage = "train"

    def pgolf_on_train_end(self, model: torch.nn.Module, ctx) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(self.config.factor)


@dataclass
class BitsConfig:
    bits: int = 6


class FewerBits(Technique):
    """Export stage: stores integer tensors with fewer bits (changes the artifact only)."""

    name = "fewer_bits"
    summary = "test technique: fewer bits per integer code"
    Config = BitsConfig
    stage = "export"

    def pgolf_on_quant_spec(self, name, tensor, spec, ctx) -> None:
        if spec.scheme == "int":
            spec.bits = self.config.bits


class HalfStride(Technique):
    """Eval stage: sliding windows at half the window length, each target scored once."""

    name = "half_stride"
    summary = "test technique: sliding-window scoring"
    stage = "eval"

    def pgolf_provide_eval_windows(self, ctx, num_tokens: int) -> EvalWindows:
        length = ctx.recipe.eval_seq_len
        stride = length // 2
        covered = ((num_tokens - 1) // length) * length
        starts = np.arange(0, covered - length + 1, stride, dtype=np.int64)
        score_from = np.where(starts == 0, 0, length - stride).astype(np.int64)
        return EvalWindows(starts, np.full(starts.size, length, dtype=np.int64), score_from, length)


@dataclass
class FailConfig:
    unless_file: str = ""


class FailsUntilFileExists(Technique):
    """Eval stage: raises until a marker file exists (a failure that a retry can fix)."""

    name = "fails_until_file_exists"
    summary = "test technique: fails while a file is missing"
    Config = FailConfig
    stage = "eval"

    def pgolf_provide_eval_windows(self, ctx, num_tokens: int) -> EvalWindows:
        if not Path(self.config.unless_file).is_file():
            raise RuntimeError(f"boom: {self.config.unless_file} is missing")
        return plain_windows(num_tokens, ctx.recipe.eval_seq_len)


@dataclass
class ReserveConfig:
    seconds: float = 2.0


class Reserve(Technique):
    """Export stage that takes seconds off a wallclock cap (as GPTQ calibration does).

    For planning tests only: its one hook is a train-stage ``contribute`` hook, so in a run it
    never acts at its own stage and the run fails ("never acted"), as it should.
    """

    name = "reserve"
    summary = "test technique: a train-time reserve"
    Config = ReserveConfig
    stage = "export"

    def pgolf_contribute_train_reserve_seconds(self, ctx) -> float:
        return self.config.seconds


class MisdeclaredEval(Technique):
    """Declares the eval stage but acts during training: the ablation must refuse it."""

    name = "misdeclared_eval"
    summary = "test technique: wrong stage declaration"
    stage = "eval"

    def pgolf_on_step_end(self, model, ctx) -> None:
        with torch.no_grad():
            next(model.parameters()).mul_(1.0)

"""Weight averaging (EMA or SWA), swapped in after training and before export.

Records from #287 on keep an fp32 exponential moving average of every weight, updated after each
optimizer step from the first timed step, and load it into the model when training ends, so the
pre-quantization eval, GPTQ calibration and quantization all see the averaged weights. Earlier
records (#162, #180, #265) took a uniform mean of snapshots every N steps once the warmdown LR
multiplier fell below a threshold (SWA).

One technique, one averaging rule per run: ``mode: ema`` or ``mode: swa``. Records that collected
SWA snapshots next to an EMA (#414, #549, #1019) only ever applied the EMA, which is ``mode: ema``.
``blend`` mixes the averaged weights with the final raw ones (1.0 = averaged only, as every record
ran), so an ablation can test whether a partial average quantizes better than a full one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pgolf.api import RunContext, Technique


@dataclass
class EMAConfig:
    decay: float = 0.997  # #287 to #1514; #1493 and every later record use 0.9965
    mode: Literal["ema", "swa"] = "ema"
    swa_every: int = 50  # SWA: snapshot every N optimizer steps (#162, #180; #265 used 120)
    swa_start_scale: float = 0.5  # SWA: only while the warmdown LR multiplier is below this (#162; #180 0.4)
    blend: float = 1.0  # weight of the averaged weights in the final ones; the rest is the raw weights

    def validate(self) -> tuple[str, str] | None:
        if not 0.0 <= self.decay < 1.0:
            return "decay", f"decay must lie in [0, 1), got {self.decay} (the records use 0.997 or 0.9965)"
        if self.swa_every < 1:
            return "swa_every", f"swa_every must be a positive number of steps, got {self.swa_every}"
        if self.swa_start_scale <= 0.0:
            return "swa_start_scale", "swa_start_scale must be positive (SWA collects while lr_scale < it)"
        if not 0.0 <= self.blend <= 1.0:
            return "blend", f"blend must lie in [0, 1] (1 = averaged weights only), got {self.blend}"
        return None


# --- functional core ---------------------------------------------------------------------------


def float_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's floating-point state tensors. They alias the live parameters, which every
    optimizer updates in place, so one capture at the start of training tracks the whole run."""
    return {name: t for name, t in model.state_dict().items() if t.is_floating_point()}


class ExponentialAverage:
    """An fp32 shadow of some live tensors: ``shadow = d * shadow + (1 - d) * live`` per update."""

    def __init__(self, live: dict[str, Tensor], decay: float) -> None:
        self.names = list(live)
        self.live = [live[n] for n in self.names]
        self.shadow = [t.detach().float().clone() for t in self.live]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [t.float() for t in self.live], 1.0 - self.decay)
        self.updates += 1

    def average(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.shadow, strict=True))


class SnapshotAverage:
    """A uniform fp32 mean of snapshots of some live tensors (SWA)."""

    def __init__(self, live: dict[str, Tensor]) -> None:
        self.names = list(live)
        self.live = [live[n] for n in self.names]
        self.sums = [torch.zeros_like(t, dtype=torch.float32) for t in self.live]
        self.count = 0

    @torch.no_grad()
    def collect(self) -> None:
        torch._foreach_add_(self.sums, [t.float() for t in self.live])
        self.count += 1

    def average(self) -> dict[str, Tensor] | None:
        """The mean, or None with fewer than two snapshots (the records then keep the raw weights)."""
        if self.count < 2:
            return None
        return {n: s / self.count for n, s in zip(self.names, self.sums, strict=True)}


def swa_collects(step: int, lr_scale: float, every: int, start_scale: float) -> bool:
    """Whether SWA snapshots after optimizer step `step` (1-based) taken at LR multiplier `lr_scale`."""
    return lr_scale < start_scale and step % every == 0


@torch.no_grad()
def load_average(live: dict[str, Tensor], average: dict[str, Tensor], blend: float = 1.0) -> None:
    """Write ``blend * average + (1 - blend) * live`` into the live tensors, in their own dtype."""
    for name, t in live.items():
        mixed = average[name] * blend + t.float() * (1.0 - blend)
        t.copy_(mixed.to(dtype=t.dtype))


# --- plugin ------------------------------------------------------------------------------------


class EMA(Technique):
    name = "ema"
    summary = "EMA (or SWA) of all weights in fp32, swapped in after training so export sees the average"
    Config = EMAConfig
    stage = "train"
    follows = ("#287 EMA 0.997 (#414: -0.0006 BPB); #1493 on 0.9965; SWA #162/#180/#265 "
               "(#180 start 0.4: -0.0006)")

    def pgolf_on_train_start(self, model: nn.Module, ctx: RunContext) -> None:
        live = float_state(model)
        cfg: EMAConfig = self.config
        ctx.stash[self.name] = ExponentialAverage(live, cfg.decay) if cfg.mode == "ema" else SnapshotAverage(live)

    def pgolf_on_step_end(self, model: nn.Module, ctx: RunContext) -> None:
        cfg: EMAConfig = self.config
        averager = ctx.stash[self.name]
        if cfg.mode == "ema":
            averager.update()
        elif swa_collects(ctx.clock.step, ctx.clock.lr_scale, cfg.swa_every, cfg.swa_start_scale):
            averager.collect()

    def pgolf_on_train_end(self, model: nn.Module, ctx: RunContext) -> None:
        cfg: EMAConfig = self.config
        averager = ctx.stash[self.name]
        average = averager.average()
        if average is None:
            ctx.log(f"ema: swa collected {averager.count} snapshot(s) (needs 2; lr_scale < {cfg.swa_start_scale} "
                    f"every {cfg.swa_every} steps), keeping the raw weights")
            return
        load_average(float_state(model), average, cfg.blend)
        what = f"{averager.updates} EMA updates" if cfg.mode == "ema" else f"{averager.count} SWA snapshots"
        ctx.log(f"ema: loaded the average of {what} (blend {cfg.blend})")

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any] | None:
        averager = ctx.stash.get(self.name)
        if averager is None:  # an eval-only session: the averaging happened in the run that trained
            return None
        cfg: EMAConfig = self.config
        count = averager.updates if cfg.mode == "ema" else averager.count
        return {"averaging": {"mode": cfg.mode, "averaged": count, "blend": cfg.blend,
                              "applied": cfg.mode == "ema" or count >= 2}}

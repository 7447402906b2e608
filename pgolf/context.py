"""The run context every hook receives: recipe, device, data, ranks, step state, and a stash.

Hooks take explicit arguments for the object they act on (a model, a tensor, scores) and this
context for everything else. Per-technique private state goes in ``ctx.stash[technique]``
rather than ad-hoc attributes, so techniques cannot collide.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pgolf.recipe import Recipe

if TYPE_CHECKING:
    import pluggy

    from pgolf.data import Dataset
    from pgolf.registry import Enabled


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (main rank only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def log(self, **values: Any) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **values}) + "\n")


@dataclass
class RunContext:
    recipe: Recipe
    device: torch.device
    dist: Distributed = field(default_factory=Distributed)
    enabled: list[Enabled] = field(default_factory=list)
    hook: Any = None  # pluggy HookRelay of this run's plugin manager
    pm: pluggy.PluginManager | None = None
    data: Dataset | None = None
    out_dir: Path | None = None
    log: Callable[[str], None] = print
    metrics: MetricsLog = field(default_factory=lambda: MetricsLog(None))
    stash: dict[str, Any] = field(default_factory=dict)
    # training state, updated by the host loop
    step: int = 0
    frac: float = 0.0  # elapsed fraction of the (reserve-adjusted) training budget
    lr_scale: float = 1.0
    elapsed_seconds: float = 0.0
    train_reserve_seconds: float = 0.0
    # evaluation state
    audit_positions: list[int] = field(default_factory=list)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast on CUDA as the challenge; float32 on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def autocast(self) -> Any:
        dtype = self.autocast_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def technique(self, name: str) -> Any:
        """The enabled technique instance named `name`, or None."""
        for e in self.enabled:
            if e.name == name or e.key == name:
                return e.instance
        return None

    def is_enabled(self, name: str) -> bool:
        return self.technique(name) is not None

    @property
    def dataset(self) -> Dataset:
        if self.data is None:
            raise RuntimeError("the data stage has not run yet")
        return self.data

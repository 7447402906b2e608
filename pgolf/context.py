"""What a hook may touch besides the object it acts on: the run context and its parts.

Every hook receives a `RunContext`. It holds the recipe (read-only once ``pgolf_configure`` has
run), the device and ranks, a log and metrics, a typed stash for a technique's own state, a
read-only view of the training data (never validation data), the training clock, and the host
services that several techniques share. It holds no plugin manager and no other technique:
techniques talk through hooks and services, never to each other.

This module sits at the bottom of the host: it imports only the recipe types, so every other
host module (and `pgolf.api`, which re-exports it) can depend on it without a circle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from pgolf.recipe import Recipe

T = TypeVar("T")


@dataclass(frozen=True)
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


class StashKey(Generic[T]):
    """A typed key into `Stash` (as pytest's): a technique's module owns its keys, so none collide."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Per-run state of techniques, keyed by `StashKey` objects (or a technique's own name)."""

    def __init__(self) -> None:
        self._items: dict[StashKey[Any] | str, Any] = {}

    def __getitem__(self, key: StashKey[T] | str) -> T:
        return self._items[key]

    def __setitem__(self, key: StashKey[T] | str, value: T) -> None:
        self._items[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def get(self, key: StashKey[T] | str, default: Any = None) -> T | Any:
        return self._items.get(key, default)

    def setdefault(self, key: StashKey[T] | str, default: T) -> T:
        return self._items.setdefault(key, default)


@dataclass
class TrainClock:
    """Where training stands; the host loop updates it, techniques read it."""

    step: int = 0
    frac: float = 0.0  # elapsed fraction of the (reserve-adjusted) training budget, or of the steps
    lr_scale: float = 1.0  # the warmdown multiplier of the current step (a step-start hook may scale it)
    seq_len: int = 0  # the current step's training sequence length, 0 = train.seq_len (a step-start hook sets it)
    reserve_seconds: float = 0.0  # taken off the wallclock cap for work charged to training


@dataclass
class WarmupPhase:
    """A graph variant to warm before timing (enter switches it on, exit back off)."""

    name: str
    enter: Callable[[], None]
    exit: Callable[[], None]


class TrainingData(Protocol):
    """What the host's dataset offers the data view (pgolf.data.dataset.Dataset)."""

    bos_id: int
    vocab_size: int
    tokenizer_path: Path
    source: str

    def train_stream(self, purpose: str = "train") -> Any: ...

    def train_shard_tokens(self, purpose: str) -> Iterator[np.ndarray]: ...


class DataView:
    """The part of the data a technique may read: tokenizer facts and ledgered training data.

    Validation tokens are not reachable from here (the host scores them); every training read
    is recorded in the run's data ledger under its purpose, which the no-leakage audit checks.
    """

    def __init__(self, bos_id: int, vocab_size: int, source: TrainingData | None = None,
                 batches: Callable[[str, int], list[Tensor]] | None = None) -> None:
        self.bos_id = bos_id
        self.vocab_size = vocab_size
        self._source = source
        self._batches = batches

    def _need(self) -> TrainingData:
        if self._source is None:
            raise RuntimeError("no training data in this run (an artifact is evaluated on its own)")
        return self._source

    @property
    def tokenizer_path(self) -> Path:
        return self._need().tokenizer_path

    def train_batches(self, purpose: str, count: int) -> list[Tensor]:
        """`count` training input batches of this rank, shaped and placed like the training loop's
        micro-batches (read from the start of the training stream, recorded under `purpose`)."""
        if self._batches is None:
            raise RuntimeError("no training data in this run (an artifact is evaluated on its own)")
        return self._batches(purpose, count)

    def train_shard_tokens(self, purpose: str) -> Iterator[np.ndarray]:
        """Each training shard's tokens in order, each read recorded under `purpose`."""
        return self._need().train_shard_tokens(purpose)


class HostServices(Protocol):
    """Work several techniques share, done once by the host (see `pgolf.services`)."""

    def calibration_hessians(self) -> Mapping[str, Tensor]:
        """Mean calibration Hessian ``E[XᵀX]`` per weight name of the model being exported.

        Collected once per export from the batches the technique providing
        ``pgolf_provide_calibration`` supplies, with per-position weights from
        ``pgolf_contribute_calibration_weights``, summed over ranks. Used by gptq and sdclip.
        """
        ...

    def measure_export(self, state: Mapping[str, Tensor]) -> int:
        """Counted bytes (compressed model + code) of exporting `state` with every enabled
        export technique, as the export stage would, without writing anything."""
        ...


@dataclass
class RunContext:
    recipe: Recipe
    device: torch.device
    dist: Distributed = field(default_factory=Distributed)
    log: Callable[[str], None] = print
    metrics: MetricsLog = field(default_factory=lambda: MetricsLog(None))
    stash: Stash = field(default_factory=Stash)
    data: DataView = field(default_factory=lambda: DataView(bos_id=1, vocab_size=0))
    clock: TrainClock = field(default_factory=TrainClock)
    services: HostServices | None = None

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 autocast on CUDA as the challenge; float32 on CPU."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def autocast(self) -> Any:
        dtype = self.autocast_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)


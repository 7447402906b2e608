"""The process a run lives in: ranks, device, seeds, and the facts a manifest records about them."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import random
import socket
import subprocess
import sys
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import pgolf
from pgolf.context import Distributed


def init_distributed() -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local)


def pick_device(distributed: Distributed, requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank)
    return torch.device("cpu")


def device_kind() -> str:
    """The hardware a checkpoint was trained on enters its key: CPU float32 and CUDA bf16 differ."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def git_sha() -> str | None:
    root = Path(pgolf.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.cache
def _distributions_by_module() -> Mapping[str, list[str]]:
    """Top-level module -> distributions: reads every installed distribution's file list (seconds), so once."""
    return packages_distributions()


def module_version(module: str) -> str:
    """The installed version of the distribution a module comes from (pgolf's for built-ins)."""
    top = module.split(".")[0]
    if top in ("pgolf", "pgolf_plugins"):
        return pgolf.__version__
    for dist_name in _distributions_by_module().get(top, []):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            continue
    return pgolf.__version__


def environment(device: torch.device, distributed: Distributed) -> dict[str, Any]:
    """Where a run ran, for its manifest."""
    return {
        "pgolf_version": pgolf.__version__,
        "git_sha": git_sha(),
        "command": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "host": socket.gethostname(),
        "world_size": distributed.world_size,
        "threads": torch.get_num_threads(),
    }

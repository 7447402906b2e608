"""What to ablate: the fields of an `ablations/*.yaml` spec file and of `pgolf ablate`'s flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pgolf.config import Provenance, build_dataclass, to_plain
from pgolf.errors import ConfigError
from pgolf.recipe import RECIPES_DIR, flag_overrides, read_yaml

Design = Literal["factorial", "one-at-a-time", "leave-one-out"]
Executor = Literal["local", "ray"]
BaselineMode = Literal["all-off", "recipe"]
DEFAULT_SEEDS = (42, 314, 999)


@dataclass
class AblationSpec:
    """What to ablate: the fields of an `ablations/*.yaml` file and of `pgolf ablate`'s flags."""

    recipe: str
    toggle: list[str]
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    design: Design = "factorial"
    baseline: BaselineMode = "all-off"
    workers: int | None = None  # local: worker processes (default 1); ray: a cap on jobs in flight
    executor: Executor = "local"  # local worker processes, or tasks on a Ray cluster (pgolf.study.ray_executor)
    address: str | None = None  # the Ray cluster's head, HOST:PORT (default: RAY_ADDRESS, else a local cluster)
    out: str | None = None
    scale: str | None = None
    data: str | None = None
    tokenizer: str | None = None
    steps: int | None = None
    set: list[str] = field(default_factory=list)
    name: str | None = None
    description: str = ""
    gpu_hour_usd: float | None = None  # the price of one GPU-hour: turns projected device time into money
    gpus_per_job: int = 1  # pgolf ablate runs each stage job on one GPU
    max_usd: float | None = None  # refuse to start a study projected to cost more (or of unknown cost)
    stop_when_decided: bool = False  # skip the seeds left once no outcome of them can change a verdict

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if not self.toggle:
            problems.append(("toggle", "name at least one technique to toggle"))
        elif len(set(self.toggle)) != len(self.toggle):
            problems.append(("toggle", "a technique is toggled twice"))
        if not self.seeds:
            problems.append(("seeds", "give at least one seed (three is the leaderboard's norm)"))
        elif len(set(self.seeds)) != len(self.seeds):
            problems.append(("seeds", "a seed is listed twice; every launched seed counts once"))
        if self.workers is not None and self.workers < 1:
            problems.append(("workers", "workers must be at least 1"))
        if self.address is not None and self.executor != "ray":
            problems.append(("address", "address names a Ray cluster: it needs executor: ray (--executor ray)"))
        if self.gpus_per_job < 1:
            problems.append(("gpus_per_job", "gpus_per_job must be at least 1 (pgolf ablate runs each job on one GPU)"))
        if self.gpu_hour_usd is not None and not self.gpu_hour_usd >= 0:
            problems.append(("gpu_hour_usd", f"gpu_hour_usd must be a price of zero or more, got {self.gpu_hour_usd}"))
        if self.max_usd is not None and not self.max_usd >= 0:
            problems.append(("max_usd", f"max_usd must be zero or more, got {self.max_usd}"))
        elif self.max_usd is not None and self.gpu_hour_usd is None:
            problems.append(("max_usd", "max_usd needs gpu_hour_usd (--gpu-hour-usd, the price of one GPU-hour) "
                                        "to turn projected device time into money"))
        return problems

    def overrides(self) -> list[str]:
        return flag_overrides(self.data, self.tokenizer, None, self.steps, self.set)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def split_list(value: Any) -> Any:
    """'a,b' -> ['a', 'b'] (flags and spec files may write lists either way)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def is_spec_file(path: Path) -> bool:
    """An ablation spec names its recipe; a recipe never has a `recipe:` key."""
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    data, _ = read_yaml(path)
    return "recipe" in data


def load_spec(path: Path, flags: dict[str, Any]) -> AblationSpec:
    """An ablation spec file, with command-line flags (those given) taking precedence."""
    data, lines = read_yaml(path)
    recipe = data.get("recipe")
    if isinstance(recipe, str):
        data["recipe"] = str(resolve_recipe_path(recipe, path.parent))
    for key in ("toggle", "seeds", "set"):
        if key in data:
            data[key] = split_list(data[key])
    data.update({k: v for k, v in flags.items() if v is not None})
    data.setdefault("name", path.stem)
    return build_dataclass(AblationSpec, data, "", Provenance(lines, default_file=str(path)))


def spec_from_flags(recipe: Path, flags: dict[str, Any]) -> AblationSpec:
    data = {"recipe": str(recipe), **{k: v for k, v in flags.items() if v is not None}}
    if "toggle" not in data:
        raise ConfigError("no techniques to toggle", key="--toggle",
                          hint="Pass --toggle a,b (techniques of the recipe, or any installed technique).")
    return build_dataclass(AblationSpec, data, "", Provenance(default_file="pgolf ablate"))


def resolve_recipe_path(name: str, base: Path) -> Path:
    for candidate in (base / name, Path(name), RECIPES_DIR / name):
        if candidate.is_file():
            return candidate.resolve()
    return base / name  # load_recipe reports the missing file with a suggestion


def default_out_dir(spec: AblationSpec) -> Path:
    """Deterministic, so running the same command again resumes the same ablation."""
    if spec.name:
        return Path("runs") / f"ablate-{spec.name}"
    stem = Path(spec.recipe).stem
    parts = [stem, *([spec.scale] if spec.scale else []), *spec.toggle]
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.+-]", "_", "ablate-" + "-".join(parts))

"""Content-addressed stage outputs: trained checkpoints, artifacts and results, keyed by what made them.

A run's work splits at the lifecycle's two cache keys (DESIGN.md). Each key hashes everything
that can change that stage's output, so an ablation trains once per distinct training key and
re-exports or re-scores only what a toggle really changes:

- train: the configured data/model/train/optim sections (after every technique's
  `pgolf_configure`), the seed, the train-stage techniques (class, config, version, source),
  the data fingerprint, pgolf's version and source, torch and the device kind, and for
  wallclock-capped runs the reserve seconds techniques take off the cap;
- export: the train key, the configured export section and the export-stage techniques;
- eval: the export key, the configured eval section and the eval-stage techniques.

Entries are directories written under a temporary name and renamed into place, so a killed
worker (even `kill -9`) leaves either a finished entry or a stale temporary that the next
invocation removes. A stage that failed leaves `<key>.error.json` beside the entries.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pgolf
from pgolf.registry import STAGES, Enabled, Stage

if TYPE_CHECKING:
    from pgolf.lifecycle import Session

# Pure logging settings that cannot change what a stage produces.
INERT_KEYS = {"train": ("log_every",), "data": ("dir", "tokenizer")}  # data content enters as its fingerprint
STAGE_SECTIONS: dict[Stage, tuple[str, ...]] = {"train": ("data", "model", "train", "optim"), "export": ("export",),
                                                "eval": ("eval",)}
TEMP_PREFIX = ".tmp-"


def canonical_hash(material: Any) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.cache
def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# Modules that only orchestrate, judge or print runs: editing them cannot change a stage's output.
NOT_IN_OUTPUTS = frozenset({"__init__.py", "__main__.py", "cli.py", "ablation.py", "ablation_report.py", "stats.py",
                            "stagecache.py", "reporter.py", "evalonly.py", "errors.py"})


@functools.lru_cache(maxsize=1)
def pgolf_source_hash() -> str:
    """pgolf's own code: a changed host (training loop, export, eval) must not reuse stale work."""
    root = Path(pgolf.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if path.name in NOT_IN_OUTPUTS:
            continue
        h.update(str(path.relative_to(root)).encode())
        h.update(_file_sha(str(path)).encode())
    return h.hexdigest()[:16]


def technique_identity(e: Enabled) -> dict[str, Any]:
    """A technique as a cache key sees it: which class, configured how, from which code."""
    from pgolf.lifecycle import _module_version

    source = inspect.getsourcefile(e.cls)
    return {"key": e.key, "class": f"{e.cls.__module__}:{e.cls.__qualname__}", "config": e.config_dict(),
            "version": _module_version(e.cls.__module__), "source": _file_sha(source) if source else None}


def _section(recipe_dict: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in (recipe_dict.get(name) or {}).items() if k not in INERT_KEYS.get(name, ())}


@dataclass(frozen=True)
class StageKeys:
    train: str
    export: str
    eval: str

    def of(self, stage: Stage) -> str:
        return getattr(self, stage)


def stage_key_material(session: Session, data_fingerprint: str, device_kind: str,
                       reserve_seconds: float) -> dict[Stage, dict[str, Any]]:
    """What each stage's output depends on, beyond the earlier stage's key (see the module docstring)."""
    import torch

    configured = session.recipe.to_dict()  # after pgolf_configure: what the stage really runs
    by_stage: dict[Stage, list[dict[str, Any]]] = {s: [] for s in STAGES}
    for e in session.enabled:
        by_stage[e.stage].append(technique_identity(e))
    capped = bool(session.recipe.train.max_wallclock_seconds)
    train = {
        "sections": {name: _section(configured, name) for name in STAGE_SECTIONS["train"]},
        "seed": session.recipe.seed,
        "techniques": by_stage["train"],
        "data": data_fingerprint,
        "pgolf": {"version": pgolf.__version__, "source": pgolf_source_hash()},
        "torch": torch.__version__,
        "device": device_kind,
        "reserve_seconds": reserve_seconds if capped else None,
    }
    export = {"sections": {"export": _section(configured, "export")}, "techniques": by_stage["export"]}
    evaluation = {"sections": {"eval": _section(configured, "eval")}, "techniques": by_stage["eval"]}
    return {"train": train, "export": export, "eval": evaluation}


def stage_keys(material: dict[Stage, dict[str, Any]]) -> StageKeys:
    train = canonical_hash({"stage": "train", **material["train"]})
    export = canonical_hash({"stage": "export", "after": train, **material["export"]})
    evaluation = canonical_hash({"stage": "eval", "after": export, **material["eval"]})
    return StageKeys(train, export, evaluation)


class StageCache:
    """`root/<stage>/<key>/` holds a finished stage output; `root/<stage>/<key>.error.json` a failure."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, stage: Stage, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: Stage, key: str) -> bool:
        return self.entry(stage, key).is_dir()

    def read_json(self, stage: Stage, key: str, name: str) -> dict[str, Any]:
        return json.loads((self.entry(stage, key) / name).read_text(encoding="utf-8"))

    def error_path(self, stage: Stage, key: str) -> Path:
        return self.root / stage / f"{key}.error.json"

    def error(self, stage: Stage, key: str) -> dict[str, Any] | None:
        path = self.error_path(stage, key)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def clear_error(self, stage: Stage, key: str) -> None:
        self.error_path(stage, key).unlink(missing_ok=True)

    def record_error(self, stage: Stage, key: str, payload: dict[str, Any]) -> None:
        write_json_atomic(self.error_path(stage, key), payload)

    @contextmanager
    def writing(self, stage: Stage, key: str) -> Iterator[Path]:
        """A temporary directory that becomes the entry only if the block finishes."""
        final = self.entry(stage, key)
        tmp = final.parent / f"{TEMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.is_dir():  # not a lost race with another writer of the same key
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.clear_error(stage, key)

    def remove_stale_temporaries(self) -> int:
        """Temporaries of killed writers; call only while holding the ablation directory's lock."""
        count = 0
        for stage in STAGES:
            folder = self.root / stage
            if folder.is_dir():
                for tmp in folder.glob(f"{TEMP_PREFIX}*"):
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                    count += 1
        return count


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write under a temporary name in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)

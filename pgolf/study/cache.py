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

Every entry also holds `checksums.json`, written last before the rename: each file's size and
SHA-256. An entry counts as done only while it verifies against it, and the readers
(`read_bytes`, `read_json`, `path_verified`) return only content that matches it. An entry that
does not verify (damaged, edited, truncated, or written by a pgolf without checksums) is
reported in one line and renamed aside to `.corrupt-<key>-<time>`, so the stage is recomputed.

On a Ray cluster the cache is on storage every node shares; what that filesystem must provide for
these writes and checks to hold across nodes is listed in `pgolf.study.ray_executor`.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pgolf
from pgolf.errors import DataError
from pgolf.products import write_json
from pgolf.registry import STAGES, Enabled, Stage

if TYPE_CHECKING:
    from pgolf.host import Session

# Pure logging settings that cannot change what a stage produces.
INERT_KEYS = {"train": ("log_every",), "data": ("dir", "tokenizer")}  # data content enters as its fingerprint
STAGE_SECTIONS: dict[Stage, tuple[str, ...]] = {"train": ("data", "model", "train", "optim"), "export": ("export",),
                                                "eval": ("eval",)}
TEMP_PREFIX = ".tmp-"
CORRUPT_PREFIX = ".corrupt-"
CHECKSUMS_FILE = "checksums.json"  # in every entry: each file's size and SHA-256, written before the rename
CHECKSUMS_FORMAT = "pgolf-stage-checksums/1"


def canonical_hash(material: Any) -> str:
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@functools.cache
def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# Modules that only orchestrate, judge or print runs (paths under pgolf/): editing them cannot
# change a stage's output. The whole study package is tooling around the host's stages.
NOT_IN_OUTPUTS = ("__init__.py", "__main__.py", "cli.py", "reporter.py", "errors.py", "testing.py", "study/*")


@functools.lru_cache(maxsize=1)
def pgolf_source_hash() -> str:
    """pgolf's own code: a changed host (training loop, export, eval) must not reuse stale work."""
    root = Path(pgolf.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if path.name == "__init__.py" or any(fnmatch.fnmatch(relative, pattern) for pattern in NOT_IN_OUTPUTS):
            continue
        h.update(relative.encode())
        h.update(_file_sha(str(path)).encode())
    return h.hexdigest()[:16]


def technique_identity(e: Enabled) -> dict[str, Any]:
    """A technique as a cache key sees it: which class, configured how, from which code."""
    from pgolf.runtime import module_version

    source = inspect.getsourcefile(e.cls)
    return {"key": e.key, "class": f"{e.cls.__module__}:{e.cls.__qualname__}", "config": e.config_dict(),
            "version": module_version(e.cls.__module__), "source": _file_sha(source) if source else None}


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


class CorruptCacheEntry(DataError):
    """A cached stage output no longer matches the checksums recorded when it was written.

    The entry has already been reported and moved aside when this is raised: running the
    ablation again recomputes it.
    """

    def __init__(self, stage: Stage, key: str, reason: str) -> None:
        self.stage, self.cache_key, self.reason = stage, key, reason  # `key` is PgolfError's config key
        super().__init__(f"cached {stage} output {key} is damaged ({reason})",
                         hint="It was moved aside; run the same command again to recompute it.")

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries like any exception
        return type(self), (self.stage, self.cache_key, self.reason)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _stat_signature(path: Path) -> tuple[int, ...]:
    """Changes whenever the file is replaced or written (ctime moves even if mtime is put back)."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _entry_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Unverified(Exception):
    """Why an entry failed verification (internal: turned into a report and a quarantine)."""


class StageCache:
    """`root/<stage>/<key>/` holds a finished stage output; `root/<stage>/<key>.error.json` a failure.

    `log` receives one line per damaged entry or error record found (default: stderr).
    Verification is memoised per instance: `done` re-hashes an entry only when one of its
    files (or the entry itself) was replaced or written since it last verified.
    """

    def __init__(self, root: Path, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.log = log or _stderr_log
        self._verified: dict[tuple[Stage, str], tuple[tuple[str, ...], tuple[Any, ...]]] = {}

    def entry(self, stage: Stage, key: str) -> Path:
        return self.root / stage / key

    # - verification -

    def done(self, stage: Stage, key: str) -> bool:
        """The entry exists and verifies; one that does not is reported and moved aside."""
        folder = self.entry(stage, key)
        if not folder.is_dir():
            self._verified.pop((stage, key), None)
            return False
        memo = self._verified.get((stage, key))
        if memo is not None:
            names, signature = memo
            try:
                if self._signature(folder, names) == signature:
                    return True
            except OSError:
                pass
            del self._verified[(stage, key)]
        try:
            names, signature = self._verify(stage, key)
        except _Unverified as why:
            self._quarantine(stage, key, str(why))
            return False
        self._verified[(stage, key)] = names, signature
        return True

    def _signature(self, folder: Path, names: tuple[str, ...]) -> tuple[Any, ...]:
        return tuple(_stat_signature(folder / name) for name in ("", CHECKSUMS_FILE, *names))

    def _checksums(self, stage: Stage, key: str) -> dict[str, dict[str, Any]]:
        path = self.entry(stage, key) / CHECKSUMS_FILE
        if not path.is_file():
            raise _Unverified(f"{CHECKSUMS_FILE} is missing (an entry from an older pgolf, or damaged)")
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _Unverified(f"{CHECKSUMS_FILE} is unreadable ({type(exc).__name__})") from None
        files = recorded.get("files") if isinstance(recorded, dict) else None
        if (not isinstance(files, dict) or recorded.get("format") != CHECKSUMS_FORMAT
                or recorded.get("stage") != stage or recorded.get("key") != key
                or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                           for v in files.values())):
            raise _Unverified(f"{CHECKSUMS_FILE} does not describe {stage} entry {key}")
        return files

    def _verify(self, stage: Stage, key: str) -> tuple[tuple[str, ...], tuple[Any, ...]]:
        """Hash every recorded file; returns the names and the stat signature they verified under."""
        folder = self.entry(stage, key)
        files = self._checksums(stage, key)
        names = tuple(sorted(files))
        try:
            signature = self._signature(folder, names)  # taken first: a write during hashing shows next time
        except OSError:
            signature = None
        for name in names:
            self._check_file(folder / name, name, files[name])
        if signature is None:
            raise _Unverified("an entry file vanished while it was verified")
        return names, signature

    @staticmethod
    def _check_file(path: Path, name: str, recorded: dict[str, Any], data: bytes | None = None) -> None:
        try:
            size = len(data) if data is not None else path.stat().st_size
            if size != recorded["bytes"]:
                raise _Unverified(f"{name}: {size} bytes, {recorded['bytes']} recorded")
            digest = hashlib.sha256(data).hexdigest() if data is not None else _sha256_file(path)
        except FileNotFoundError:
            raise _Unverified(f"{name} is missing") from None
        except OSError as exc:
            raise _Unverified(f"{name} is unreadable ({exc.strerror or type(exc).__name__})") from None
        if digest != recorded["sha256"]:
            raise _Unverified(f"{name}: SHA-256 differs from the one recorded")

    def _quarantine(self, stage: Stage, key: str, reason: str) -> None:
        """Report the entry and rename it aside (keeping only the latest damaged copy of a key).

        Renamed rather than deleted: the rename is atomic (no half-deleted entry is ever left under
        the key's name) and the damaged files stay available to inspect; older copies of the same
        key are deleted so a disk that keeps damaging files cannot fill up with them.
        """
        self._verified.pop((stage, key), None)
        folder = self.entry(stage, key)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = folder.with_name(f"{CORRUPT_PREFIX}{key}-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:4]}")
        for old in folder.parent.glob(f"{CORRUPT_PREFIX}{key}-*"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        try:
            os.replace(folder, aside)
            where = f"moved aside to {aside.name}"
        except FileNotFoundError:
            where = "already moved aside"
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            where = "deleted" if not folder.exists() else f"could not be moved aside ({exc.strerror})"
        self.log(f"cache: {stage} output {key} is damaged: {reason}; {where}, it will be recomputed")

    # - readers: only verified content -

    def read_bytes(self, stage: Stage, key: str, name: str) -> bytes:
        """A file of an entry, exactly as written (else the entry is reported, moved aside, and this raises)."""
        folder = self.entry(stage, key)
        if not folder.is_dir():
            raise FileNotFoundError(f"no cached {stage} output {key}")
        try:
            recorded = self._recorded(stage, key, name)
            try:
                data = (folder / name).read_bytes()
            except FileNotFoundError:
                raise _Unverified(f"{name} is missing") from None
            self._check_file(folder / name, name, recorded, data)
        except _Unverified as why:
            self._quarantine(stage, key, str(why))
            raise CorruptCacheEntry(stage, key, str(why)) from None
        return data

    def reader(self, stage: Stage, key: str) -> Callable[[str], bytes]:
        """Verified reads of one entry's files by name, for the stage products' `read`."""
        return lambda name: self.read_bytes(stage, key, name)

    def read_json(self, stage: Stage, key: str, name: str) -> dict[str, Any]:
        return json.loads(self.read_bytes(stage, key, name).decode("utf-8"))

    def path_verified(self, stage: Stage, key: str, name: str) -> Path:
        """The path of an entry's file, checked against its checksum now (for readers that need a path)."""
        folder = self.entry(stage, key)
        if not folder.is_dir():
            raise FileNotFoundError(f"no cached {stage} output {key}")
        try:
            self._check_file(folder / name, name, self._recorded(stage, key, name))
        except _Unverified as why:
            self._quarantine(stage, key, str(why))
            raise CorruptCacheEntry(stage, key, str(why)) from None
        return folder / name

    def _recorded(self, stage: Stage, key: str, name: str) -> dict[str, Any]:
        files = self._checksums(stage, key)
        if name not in files:  # a reader's mistake, not damage: the entry is left alone
            raise FileNotFoundError(f"{name} is not a recorded file of cached {stage} output {key}")
        return files[name]

    # - errors -

    def error_path(self, stage: Stage, key: str) -> Path:
        return self.root / stage / f"{key}.error.json"

    def error(self, stage: Stage, key: str) -> dict[str, Any] | None:
        """The stored failure of a stage; an unreadable record is reported, deleted and counts as none."""
        path = self.error_path(stage, key)
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            problem = f"unreadable ({type(exc).__name__})"
        else:
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                return payload
            problem = "not a pgolf error record"
        path.unlink(missing_ok=True)
        self.log(f"cache: {stage} error record {path.name} is {problem}; deleted, the stage will be retried")
        return None

    def clear_error(self, stage: Stage, key: str) -> None:
        self.error_path(stage, key).unlink(missing_ok=True)

    def record_error(self, stage: Stage, key: str, payload: dict[str, Any]) -> None:
        write_json(self.error_path(stage, key), payload)

    # - writing -

    @contextmanager
    def writing(self, stage: Stage, key: str) -> Iterator[Path]:
        """A temporary directory that becomes the entry, with its checksums, only if the block finishes."""
        final = self.entry(stage, key)
        tmp = final.parent / f"{TEMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
            names = _entry_files(tmp)
            if CHECKSUMS_FILE in names:
                raise ValueError(f"{CHECKSUMS_FILE} is reserved for the cache's own checksums")
            files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256_file(tmp / name)}
                     for name in names}
            (tmp / CHECKSUMS_FILE).write_text(json.dumps({"format": CHECKSUMS_FORMAT, "stage": stage, "key": key,
                                                          "files": files}, indent=2) + "\n", encoding="utf-8")
            try:
                os.replace(tmp, final)
            except OSError:
                if not final.exists():
                    raise
                if not self.done(stage, key):  # a damaged entry was in the way: it is now moved aside
                    os.replace(tmp, final)
                # else: a lost race with another writer of the same key, whose entry verifies
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

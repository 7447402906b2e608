"""Jobs: one stage output each, produced by the host's own stage functions from the stored product
of the stage before (in this process or in a worker); a failure is recorded, never raised.

A train job also keeps the training metrics (`metrics.jsonl`, one line per logged step) in the
entry it produces, under the entry's checksums, so `pgolf report --html` can draw loss curves
from verified content. Entries written before this have none."""

from __future__ import annotations

import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgolf.config import Provenance
from pgolf.errors import PgolfError
from pgolf.host import Session, eval_stage, export_stage, load_data, train_stage
from pgolf.products import TRAIN_INFO_FILE, Artifact, Checkpoint, read_json
from pgolf.recipe import recipe_from_dict
from pgolf.registry import Stage
from pgolf.reporter import Reporter
from pgolf.study.cache import CorruptCacheEntry, StageCache

METRICS_FILE = "metrics.jsonl"  # in a train entry: training loss per logged step, as `pgolf run` writes it
Log = Callable[[str], None]


class JobLost(Exception):
    """A job's worker died and its executor will not run it again: the job counts as failed."""


@dataclass
class Job:
    """One stage output to produce. `recipe` is a run that needs it (all such runs share its key)."""

    stage: Stage
    key: str
    recipe: dict[str, Any]
    cache_root: str
    train_key: str
    export_key: str
    material: dict[str, Any]
    label: str
    log_path: str

    @property
    def id(self) -> tuple[Stage, str]:
        return self.stage, self.key


def _metrics_dir(job: Job) -> Path | None:
    """Beside the job's log (`logs/train-<key>/`), emptied first: a retried job must not append to a failed one."""
    if job.stage != "train":
        return None
    folder = Path(job.log_path).with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / METRICS_FILE).unlink(missing_ok=True)
    return folder


def _train_job(session: Session, job: Job, cache: StageCache) -> None:
    checkpoint = train_stage(session)
    metrics = session.ctx.metrics.path
    with cache.writing("train", job.key) as tmp:
        checkpoint.write(tmp, key=job.material)
        if metrics is not None and metrics.is_file():
            shutil.copyfile(metrics, tmp / METRICS_FILE)
        else:  # nothing was logged (train.log_every=0): an empty file says so, unlike an older entry's absence
            (tmp / METRICS_FILE).touch()


def _export_job(session: Session, job: Job, cache: StageCache) -> None:
    checkpoint = Checkpoint.read(cache.entry("train", job.train_key), cache.reader("train", job.train_key))
    artifact = export_stage(session, checkpoint)
    with cache.writing("export", job.key) as tmp:
        artifact.write(tmp, key=job.material)


def _eval_job(session: Session, job: Job, cache: StageCache) -> None:
    train = read_json(cache.entry("train", job.train_key) / TRAIN_INFO_FILE, ("info",),
                      cache.reader("train", job.train_key))
    artifact = Artifact.read(cache.entry("export", job.export_key), cache.reader("export", job.export_key))
    scored = eval_stage(session, artifact, train["info"], {"data": session.data_seconds})
    with cache.writing("eval", job.key) as tmp:
        scored.write(tmp)


STAGE_JOBS = {"train": _train_job, "export": _export_job, "eval": _eval_job}


def execute_job(job: Job) -> dict[str, Any]:
    """Produce one stage output; a failure is recorded in the cache, never raised."""
    start = time.perf_counter()
    reporter = Reporter(log_path=Path(job.log_path), quiet=True)
    cache = StageCache(Path(job.cache_root), log=reporter.log)
    reporter.log(f"== {job.stage} {job.key} for {job.label} (pid {os.getpid()})")
    try:
        session = Session(recipe_from_dict(job.recipe, Provenance(default_file=job.label)), reporter=reporter,
                          metrics_dir=_metrics_dir(job))
        load_data(session)
        STAGE_JOBS[job.stage](session, job, cache)
    except Exception as exc:  # a failing run is a result: record it and let the other runs go on
        message = exc.render() if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        reporter.write(traceback.format_exc())
        error = {"stage": job.stage, "key": job.key, "run": job.label, "error": message,
                 "type": type(exc).__name__, "traceback": traceback.format_exc(), "log": job.log_path}
        if not isinstance(exc, CorruptCacheEntry):  # a damaged input was moved aside: the next run redoes both
            cache.record_error(job.stage, job.key, error)
        return {"ok": False, "error": message, "seconds": time.perf_counter() - start}
    return {"ok": True, "seconds": time.perf_counter() - start}

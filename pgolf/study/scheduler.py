"""Running a plan: project its cost, schedule the missing stage jobs over worker processes, record every
run as it finishes, write the summary; resumable after a kill, one invocation per directory at a time.

Each finished job's wall time goes into `job_seconds.json` (the next projection's measurements).
With `stop_when_decided` the runs go seed by seed across the arms, and once `budget.decide` finds
every verdict settled the jobs not yet started are dropped and their runs recorded as skipped.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import datetime as dt
import fcntl
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgolf
from pgolf.config import to_plain
from pgolf.errors import ConfigError
from pgolf.products import write_json
from pgolf.registry import STAGES, Stage
from pgolf.study.budget import (
    JOB_SECONDS_FILE,
    STOP_RULE,
    ArmScores,
    Projection,
    all_decided,
    check_budget,
    cost_signatures,
    decide,
    job_seconds_payload,
    project,
    read_job_seconds,
    seed_major,
    survey,
)
from pgolf.study.cache import CorruptCacheEntry, StageCache
from pgolf.study.jobs import METRICS_FILE, Job, JobLost, Log, execute_job
from pgolf.study.plan import Plan, PlannedRun, plan_ablation
from pgolf.study.spec import AblationSpec, default_out_dir
from pgolf.tracking import TRACKING_DIR, Tracking, run_info

SUMMARY_FILE = "summary.json"


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the ablation process dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _init_worker(devices: Any, threads: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    import torch

    torch.set_num_threads(threads)


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][: torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


class WorkerPool:
    """Spawned worker processes: each pinned to one GPU, or given its share of the CPU threads.

    An executor: `submit` runs a job somewhere and returns a future of `execute_job`'s outcome;
    `slots` jobs run at once (`pgolf.study.ray_executor.RayExecutor` is the other one)."""

    def __init__(self, workers: int, log: Log) -> None:
        self.workers = self.slots = workers
        self.gpus = visible_gpus()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = max(1, cores // workers)
        if self.gpus and workers > len(self.gpus):
            log(f"note: {workers} workers share {len(self.gpus)} GPU(s)")
        where = f"GPUs {','.join(self.gpus)}" if self.gpus else f"{self.threads} CPU thread(s) each"
        log(f"workers: {workers} processes ({where})")
        self.pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        context = mp.get_context("spawn")
        devices = None
        if self.gpus:
            devices = context.Queue()
            for i in range(self.workers):
                devices.put(self.gpus[i % len(self.gpus)])
        return cf.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                      initargs=(devices, self.threads))

    def submit(self, job: Job) -> cf.Future:
        return self.pool.submit(execute_job, job)

    def restart(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """One `pgolf ablate` per directory at a time (released by the OS even after kill -9)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another pgolf ablate is running in {out}",
                              hint="Wait for it to finish, or pass a different --out.") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Ablation:
    """Runs a plan: schedules the missing stage jobs, records runs as they finish, writes the summary."""

    def __init__(self, plan: Plan, out: Path, log: Log, retry_failed: bool = False,
                 stop_when_decided: bool = False, tracking: Tracking | None = None) -> None:
        self.plan, self.out, self.log, self.retry_failed = plan, out, log, retry_failed
        self.tracking = tracking  # each recorded run is logged to it from its stored products
        self.stop_when_decided = stop_when_decided
        self.cache = StageCache(out / "cache", log=log)  # reports damaged entries it moves aside
        self.ran: dict[Stage, set[str]] = {s: set() for s in STAGES}
        self.failed: dict[tuple[Stage, str], str] = {}  # this invocation's failures (and stored ones)
        self.records: dict[str, dict[str, Any]] = {}
        self.job_seconds = read_job_seconds(out)
        self.stopped: dict[str, Any] | None = None  # the verdicts that let the study stop early
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    # - jobs -

    def jobs(self) -> tuple[dict[tuple[Stage, str], Job], dict[tuple[Stage, str], tuple[Stage, str] | None]]:
        """The stage outputs still missing, each with the job it waits for (seed by seed when stopping early)."""
        jobs: dict[tuple[Stage, str], Job] = {}
        deps: dict[tuple[Stage, str], tuple[Stage, str] | None] = {}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        order = seed_major(self.plan) if self.stop_when_decided else self.plan.runs
        for output in survey(order, self.cache, self.retry_failed):
            if output.state == "failed":
                self.failed[output.id] = output.error or "failed before"
            elif output.state == "run":
                self.cache.clear_error(output.stage, output.key)  # retried: its old failure no longer stands
                run, stage, key = output.runs[0], output.stage, output.key
                jobs[output.id] = Job(stage, key, run.recipe, str(self.cache.root), run.keys.train, run.keys.export,
                                      run.material[stage], run.label, str(self.out / "logs" / f"{stage}-{key}.log"))
                deps[output.id] = output.after
        return jobs, deps

    def run(self, workers: int, executor: Any = None) -> dict[str, Any]:
        """Run the missing jobs in `workers` local processes, or on `executor` (a Ray cluster) when given."""
        removed = self.cache.remove_stale_temporaries()
        if removed:
            self.log(f"removed {removed} unfinished output(s) of an interrupted earlier invocation")
        for note in self.plan.notes:
            self.log(f"note: {note}")
        jobs, deps = self.jobs()
        self.log(f"{len(self.plan.runs)} runs ({len(self.plan.arms)} arms x {len(self.plan.spec.seeds)} seeds): "
                 + ", ".join(f"{sum(1 for j in jobs if j[0] == s)} {s}" for s in STAGES) + " job(s) to do")
        self._finalize_ready()
        self._schedule(jobs, deps, workers, executor)
        if self.stopped is not None:
            self._record_skipped()
        summary = self.write_summary()
        return summary

    # - stopping when decided -

    def _arm_scores(self) -> dict[str, ArmScores]:
        """Each arm's finished val_bpb and the seeds of it still to come (neither finished nor failed)."""
        out = {}
        for arm in self.plan.arms:
            runs = [r for r in self.plan.runs if r.arm == arm]
            done = [self.records[r.record_name] for r in runs if r.record_name in self.records]
            results = [d["result"] for d in done if d["status"] == "ok"]
            rates = [res["tokens_per_byte"] for res in results if res.get("tokens_per_byte")]
            out[arm.id] = ArmScores(tuple(res["val_bpb"] for res in results), len(runs) - len(done),
                                    float(sum(rates) / len(rates)) if rates else None)
        return out

    def _decided(self) -> bool:
        """True (and the verdicts kept for the summary) once no remaining seed can change a verdict."""
        scores = self._arm_scores()
        baseline = self.plan.baseline.id
        verdicts = decide(scores[baseline], {a: s for a, s in scores.items() if a != baseline})
        if not all_decided(verdicts):
            return False
        self.stopped = {"rule": STOP_RULE, "verdicts": verdicts, "skipped": []}
        return True

    def _record_skipped(self) -> None:
        assert self.stopped is not None
        reason = "skipped: every verdict was already decided (--stop-when-decided)"
        for run in self.plan.runs:
            if run.record_name in self.records or self.run_status(run)[0] != "pending":
                continue
            record = {"arm": run.arm.id, "toggles_on": list(run.arm.on), "seed": run.seed, "status": "skipped",
                      "keys": to_plain(run.keys) if run.keys else None, "reason": reason}
            write_json(self.out / "runs" / run.record_name, record)
            self.records[run.record_name] = record
            self.stopped["skipped"].append(run.label)

    def _schedule(self, jobs: dict[tuple[Stage, str], Job], deps: dict[tuple[Stage, str], Any], workers: int,
                  executor: Any = None) -> None:
        pending = dict(jobs)
        order = {job_id: i for i, job_id in enumerate(jobs)}
        pool = executor or (WorkerPool(workers, self.log) if workers > 1 and len(jobs) > 1 else None)
        running: dict[cf.Future, Job] = {}
        crashes: dict[tuple[Stage, str], int] = {}
        started = 0
        try:
            while pending or running:
                if self.stop_when_decided and pending and self.stopped is None and self._decided():
                    self.log(f"every verdict is decided: {len(pending)} job(s) not started are skipped "
                             f"({len(running)} running finish)")
                    pending.clear()
                    continue
                for job_id in [j for j in pending if deps[j] is not None and deps[j] in self.failed]:
                    dep = deps[job_id]
                    self.failed[job_id] = f"{dep[0]} failed: {self.failed[dep]}"
                    del pending[job_id]
                ready = sorted((j for j in pending if deps[j] is None or self.cache.done(*deps[j])),
                               key=lambda j: (-STAGES.index(j[0]), order[j]))  # finish runs before starting new ones
                capacity = (pool.slots if pool else 1) - len(running)
                for job_id in ready[:capacity]:
                    job = pending.pop(job_id)
                    started += 1
                    self.log(f"[{started}/{len(jobs)}] {job.stage} {job.label} ...")
                    if pool is None:
                        self._job_done(job, execute_job(job))
                    else:
                        running[pool.submit(job)] = job
                if not running:
                    if pending and not ready:  # waiting on outputs that will not come
                        for job_id in list(pending):
                            self.failed[job_id] = "its input is missing from the cache"
                            del pending[job_id]
                    continue
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                broken = False
                for future in done:
                    job = running.pop(future)
                    try:
                        self._job_done(job, future.result())
                    except JobLost as lost:  # the executor retried it already
                        self._job_lost(job, str(lost))
                    except cf.process.BrokenProcessPool:
                        broken = True
                        crashes[job.id] = crashes.get(job.id, 0) + 1
                        if crashes[job.id] > 1:  # it was running in two pools that died: blame it
                            self._job_lost(job, "its worker process died twice (killed, or out of memory)")
                        else:
                            pending[job.id] = job
                            started -= 1
                if broken:
                    self.log("a worker process died; restarting the workers and retrying its jobs once")
                    for future, job in list(running.items()):
                        pending[job.id] = job
                        started -= 1
                        del running[future]
                    pool.restart()
        finally:
            if pool is not None:
                pool.close()

    def _job_lost(self, job: Job, error: str) -> None:
        """A job whose worker kept dying: recorded in the cache as failed, like a job that raised."""
        self.cache.record_error(job.stage, job.key, {"stage": job.stage, "key": job.key, "run": job.label,
                                                     "error": error})
        self._job_done(job, {"ok": False, "error": error})

    def _job_done(self, job: Job, outcome: dict[str, Any]) -> None:
        if outcome["ok"] and outcome["seconds"] is None:  # a retried job found its output made by the attempt that died
            self.ran[job.stage].add(job.key)
            self.log(f"    {job.stage} {job.label}: done (finished by an earlier attempt)")
        elif outcome["ok"]:
            self.ran[job.stage].add(job.key)
            self.log(f"    {job.stage} {job.label}: done in {outcome['seconds']:.1f}s")
            self._record_seconds(job, outcome["seconds"])
        else:
            self.failed[job.id] = outcome["error"]
            self.log(f"    {job.stage} {job.label}: FAILED: {outcome['error']} (log: {job.log_path})")
        self._finalize_ready()

    def _record_seconds(self, job: Job, seconds: float) -> None:
        """Keep the job's wall time, under its seed-free signature, for later projections."""
        run = next(r for r in self.plan.runs if r.keys is not None and r.keys.of(job.stage) == job.key)
        self.job_seconds[job.stage][job.key] = {"seconds": round(seconds, 3), "seed": run.seed,
                                                "signature": cost_signatures(run.material)[job.stage]}
        write_json(self.out / JOB_SECONDS_FILE, job_seconds_payload(self.job_seconds))

    # - records -

    def run_status(self, run: PlannedRun) -> tuple[str, Stage | None, str | None]:
        """ok / failed (with the stage and error) / pending."""
        if run.error is not None:
            return "failed", None, run.error
        assert run.keys is not None
        if self.cache.done("eval", run.keys.eval):
            return "ok", None, None
        for stage in STAGES:
            key = run.keys.of(stage)
            if self.cache.done(stage, key):
                continue
            if (stage, key) in self.failed:
                return "failed", stage, self.failed[(stage, key)]
            return "pending", None, None
        return "pending", None, None

    def _stage_use(self, run: PlannedRun) -> dict[str, str]:
        """For each stage: 'ran' if this run's job produced it in this invocation, else 'reused'."""
        out = {}
        for stage in STAGES:
            key = run.keys.of(stage)
            first = next(r for r in self.plan.runs if r.keys is not None and r.keys.of(stage) == key)
            out[stage] = "ran" if key in self.ran[stage] and first is run else "reused"
        return out

    def _finalize_ready(self) -> None:
        changed = False
        for run in self.plan.runs:
            if run.record_name in self.records:
                continue
            status, stage, error = self.run_status(run)
            if status == "pending":
                continue
            record: dict[str, Any] = {"arm": run.arm.id, "toggles_on": list(run.arm.on), "seed": run.seed,
                                      "status": status, "keys": to_plain(run.keys) if run.keys else None}
            if status == "ok":
                record["stages"] = self._stage_use(run)
                try:
                    record["result"] = self.cache.read_json("eval", run.keys.eval, "result.json")
                except CorruptCacheEntry:  # damaged since it verified: reported, moved aside, pending
                    continue
            else:
                record.update(failed_stage=stage or "plan", error=error)
            write_json(self.out / "runs" / run.record_name, record)
            self.records[run.record_name] = record
            self._track(run, record)
            changed = True
        if changed:
            self.write_summary()

    def _track(self, run: PlannedRun, record: dict[str, Any]) -> None:
        """Log a recorded run to the trackers, here in the parent: its recipe, its training's stored curve
        (read verified; none for an entry trained before curves were kept) and its result."""
        if self.tracking is None:
            return
        try:
            metrics = b""
            if run.keys is not None and record["status"] == "ok":
                with contextlib.suppress(FileNotFoundError, CorruptCacheEntry):
                    metrics = self.cache.read_bytes("train", run.keys.train, METRICS_FILE)
            info = run_info(run.recipe, "ablate", f"{run.arm.slug}-seed{run.seed}",
                            experiment=f"ablate-{self.out.name}", arm=run.arm.id, study=str(self.out))
            key = f"{self.out.resolve()}/{run.record_name}@{run.keys.eval if run.keys else '-'}:{record['status']}"
            self.tracking.log_stored(key, info, metrics, record.get("result"), ok=record["status"] == "ok")
        except Exception as exc:  # tracking is a copy: the study goes on without it
            self.log(f"warning: tracking {run.label} failed ({type(exc).__name__}: {exc})")

    def counts(self) -> dict[str, dict[str, int]]:
        """Per stage: outputs produced by this invocation, and run uses of outputs that already existed."""
        out = {}
        for stage in STAGES:
            later = STAGES[STAGES.index(stage):]
            uses = sum(1 for run in self.plan.runs if run.keys is not None
                       and any(self.cache.done(s, run.keys.of(s)) for s in later))
            ran = len(self.ran[stage])
            out[stage] = {"ran": ran, "reused": uses - ran}
        return out

    def write_summary(self) -> dict[str, Any]:
        from pgolf.study.report import analyse

        plan = self.plan
        runs = [self.records.get(run.record_name) or {"arm": run.arm.id, "toggles_on": list(run.arm.on),
                                                       "seed": run.seed, "status": "pending"}
                for run in plan.runs]
        summary = {
            "pgolf_version": pgolf.__version__,
            "created": self.started,
            "updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "spec": plan.spec.to_dict(),
            "toggles": plan.toggles,
            "technique_names": plan.names,
            "in_recipe": plan.in_recipe,
            "design": plan.spec.design,
            "baseline": plan.baseline.id,
            "arms": [{"id": a.id, "label": a.label(plan.names), "on": list(a.on)} for a in plan.arms],
            "device": plan.device_kind,
            "notes": plan.notes,
            "counts": self.counts(),
            "runs": runs,
        }
        if self.stopped is not None:
            summary["stopped_when_decided"] = self.stopped
        summary["statistics"] = analyse(summary)
        write_json(self.out / SUMMARY_FILE, summary)
        return summary


@contextlib.contextmanager
def cluster_for(spec: AblationSpec, log: Log) -> Iterator[Any]:
    """The Ray cluster `executor: ray` names, connected for the block; None for local worker processes."""
    if spec.executor != "ray":
        yield None
        return
    from pgolf.study.ray_executor import RayCluster

    cluster = RayCluster(spec.address, spec.workers, log)
    try:
        yield cluster
    finally:
        cluster.disconnect()


def project_ablation(spec: AblationSpec, out: Path | None = None, *, retry_failed: bool = False,
                     log: Log = print, device_kind: str | None = None) -> tuple[Path, Plan, Projection]:
    """Plan the study and project its cost from the verified cache; runs nothing and creates nothing.
    `device_kind`: the device the jobs will run on, when not this machine's (a Ray cluster's)."""
    out = Path(out or spec.out or default_out_dir(spec))
    spec.out = str(out)
    plan = plan_ablation(spec, device_kind)
    runs = seed_major(plan) if spec.stop_when_decided else plan.runs
    projection = project(plan, StageCache(out / "cache", log=log), out, retry_failed=retry_failed,
                         gpus_per_job=spec.gpus_per_job, gpu_hour_usd=spec.gpu_hour_usd, runs=runs)
    return out, plan, projection


def run_ablation(spec: AblationSpec, out: Path | None = None, *, retry_failed: bool = False,
                 log: Log = print, track: list[str] | tuple[str, ...] = (),
                 track_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Plan, project the cost (refusing a study over spec.max_usd), run what is missing; return the
    ablation directory and its summary. `track` names trackers each run is logged to (`pgolf.tracking`)."""
    with cluster_for(spec, log) as cluster:
        out, plan, projection = project_ablation(spec, out, retry_failed=retry_failed, log=log,
                                                 device_kind=cluster.device_kind if cluster else None)
        log(f"projected: {projection.headline()}")
        check_budget(projection, spec.max_usd)
        with exclusive(out):
            tracking = Tracking.open(track, track_dir or out / TRACKING_DIR, log) if track else None
            executor = cluster.executor(out, plan) if cluster else None
            ablation = Ablation(plan, out, log, retry_failed, spec.stop_when_decided, tracking)
            summary = ablation.run(spec.workers or 1, executor)
    return out, summary

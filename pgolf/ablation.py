"""`pgolf ablate`: toggle techniques of a recipe across seeds, train each distinct model once, judge by the leaderboard's tests.

The runner plans every (arm, seed) run, computes its three stage keys (`pgolf.stagecache`),
and turns the missing stage outputs into jobs: train a checkpoint, export an artifact, score
it. An eval-stage toggle therefore re-scores the same artifact and an export-stage toggle
re-exports the same checkpoint. Jobs run in this process (`--workers 1`) or in spawned worker
processes, one per GPU or with CPU threads divided among them. Every stage output is renamed
into place only when complete, and every finished run's record is written atomically, so a
killed ablation resumes where it stopped; a failed job is recorded with its error and only the
runs that need it fail.

The ablation directory::

    summary.json                   spec, arms, counts, every run's result, the statistics
    runs/<arm>-seed<seed>.json     one record per run (its result, or its error and stage)
    cache/train/<key>/             model.pt (state dict) + train.json (info, hook trace, data reads)
    cache/export/<key>/            artifact.pga + export.json
    cache/eval/<key>/              result.json + manifest.json
    cache/<stage>/<key>.error.json a stage that failed (retried with --retry-failed)
    logs/<stage>-<key>.log         what each job printed
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import ctypes
import datetime as dt
import fcntl
import hashlib
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

import pgolf
from pgolf.config import Provenance, build_dataclass, to_plain
from pgolf.errors import ConfigError, PgolfError
from pgolf.recipe import RECIPES_DIR, flag_overrides, load_recipe, read_yaml, recipe_from_dict
from pgolf.registry import HOST_PLUGIN, STAGES, Stage, load_technique_class
from pgolf.stagecache import StageCache, StageKeys, stage_key_material, stage_keys, write_json_atomic

Design = Literal["factorial", "one-at-a-time", "leave-one-out"]
BaselineMode = Literal["all-off", "recipe"]
DEFAULT_SEEDS = (42, 314, 999)
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "model.pt"
ARTIFACT_FILE = "artifact.pga"
Log = Callable[[str], None]

# Hooks that change the train or export stage's output whenever they run (notifications may
# mutate, providers replace the host's object). A technique declared for a later stage must not
# implement them, or the cache would reuse outputs made without it. `pgolf_contribute_*` hooks
# are not listed: a technique may return None from them in a mode where it changes nothing.
STAGE_HOOKS: dict[Stage, frozenset[str]] = {
    "train": frozenset({"pgolf_provide_model", "pgolf_on_model_built", "pgolf_provide_optimizers",
                        "pgolf_on_train_start", "pgolf_on_step_start", "pgolf_on_step_end", "pgolf_on_train_end"}),
    "export": frozenset({"pgolf_on_export_start", "pgolf_on_quant_spec", "pgolf_quantize_tensor"}),
}
# Hooks every job's own session runs (construction, data): not carried over from cached stages.
SESSION_HOOKS = frozenset({"pgolf_configure", "pgolf_contribute_config_errors", "pgolf_provide_text_transform"})


# --- the study ----------------------------------------------------------------------------------


@dataclass
class AblationSpec:
    """What to ablate: the fields of an `ablations/*.yaml` file and of `pgolf ablate`'s flags."""

    recipe: str
    toggle: list[str]
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    design: Design = "factorial"
    baseline: BaselineMode = "all-off"
    workers: int = 1
    out: str | None = None
    scale: str | None = None
    data: str | None = None
    tokenizer: str | None = None
    steps: int | None = None
    set: list[str] = field(default_factory=list)
    name: str | None = None
    description: str = ""

    def validate(self) -> tuple[str, str] | None:
        if not self.toggle:
            return "toggle", "name at least one technique to toggle"
        if len(set(self.toggle)) != len(self.toggle):
            return "toggle", "a technique is toggled twice"
        if not self.seeds:
            return "seeds", "give at least one seed (three is the leaderboard's norm)"
        if len(set(self.seeds)) != len(self.seeds):
            return "seeds", "a seed is listed twice; every launched seed counts once"
        if self.workers < 1:
            return "workers", "workers must be at least 1"
        return None

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


# --- arms ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One combination of the toggles: those listed in `on` are enabled, the others removed."""

    on: tuple[str, ...]

    def label(self, names: dict[str, str]) -> str:
        return " + ".join(names.get(t, t) for t in self.on) or "(none)"

    @property
    def id(self) -> str:
        return "+".join(self.on) or "none"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.id)


def design_arms(toggles: list[str], design: Design, baseline_on: tuple[str, ...]) -> list[Arm]:
    """The arms a design runs, baseline first.

    factorial: every subset, by size. one-at-a-time: the baseline and each toggle flipped from
    it, in toggle order. leave-one-out: everything on, then everything on but each toggle in
    turn (plus the baseline arm).
    """
    def arm(on: set[str]) -> Arm:
        return Arm(tuple(t for t in toggles if t in on))

    baseline = arm(set(baseline_on))
    if design == "factorial":
        arms = [arm(set(c)) for r in range(len(toggles) + 1) for c in combinations(toggles, r)]
    elif design == "one-at-a-time":
        arms = [arm(set(baseline.on) ^ {t}) for t in toggles]
    else:
        arms = [arm(set(toggles))] + [arm(set(toggles) - {t}) for t in toggles]
    return [baseline] + [a for a in dict.fromkeys(arms) if a != baseline]


# --- planning -----------------------------------------------------------------------------------


@dataclass
class PlannedRun:
    arm: Arm
    seed: int
    recipe: dict[str, Any]  # as written for this arm and seed (techniques configure it in each job)
    keys: StageKeys | None = None
    material: dict[str, Any] | None = None
    error: str | None = None  # the arm cannot be built (conflict, missing requirement)

    @property
    def label(self) -> str:
        return f"{self.arm.id} seed {self.seed}"

    @property
    def record_name(self) -> str:
        return f"{self.arm.slug}-seed{self.seed}.json"


@dataclass
class Plan:
    spec: AblationSpec
    toggles: list[str]
    names: dict[str, str]  # toggle key -> technique name, for labels
    in_recipe: list[str]
    arms: list[Arm]
    baseline: Arm
    runs: list[PlannedRun]
    device_kind: str
    notes: list[str] = field(default_factory=list)


def device_kind() -> str:
    """The hardware a checkpoint was trained on enters its key: CPU float32 and CUDA bf16 differ."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def plan_ablation(spec: AblationSpec) -> Plan:
    """Resolve the recipe per arm and seed, and key every run's stages (nothing is trained here)."""
    from pgolf.data import load_dataset
    from pgolf.lifecycle import Session
    from pgolf.reporter import Reporter

    recipe_path = Path(spec.recipe)
    overrides = spec.overrides()
    plain = load_recipe(recipe_path, overrides, scale=spec.scale)
    full = load_recipe(recipe_path, overrides, scale=spec.scale, enable=spec.toggle)
    names = {t: load_technique_class(t, full.provenance).name or t for t in spec.toggle}
    in_recipe = [t for t in spec.toggle if t in plain.techniques]
    notes = [f"'{t}' is not in {recipe_path.name}; toggled on with its default parameters"
             for t in spec.toggle if t not in in_recipe]
    baseline_on = tuple(in_recipe) if spec.baseline == "recipe" else ()
    arms = design_arms(spec.toggle, spec.design, baseline_on)
    kind = device_kind()
    base = full.to_dict()
    quiet = Reporter(quiet=True)
    datasets: dict[tuple, Any] = {}
    runs: list[PlannedRun] = []
    failures: list[PgolfError] = []
    for arm in arms:
        for seed in spec.seeds:
            data = copy.deepcopy(base)
            data["techniques"] = {k: v for k, v in base["techniques"].items() if k not in spec.toggle or k in arm.on}
            data["seed"] = seed
            run = PlannedRun(arm, seed, data)
            runs.append(run)
            try:
                session = Session(recipe_from_dict(data, full.provenance, default_name=full.name), reporter=quiet)
            except PgolfError as exc:
                run.error = exc.render()
                failures.append(exc)
                continue
            check_declared_stages(session.enabled, full.provenance)
            r = session.recipe
            transform = session.hook.pgolf_provide_text_transform(ctx=session.ctx)
            signature = (r.data.dir, r.data.tokenizer, r.model.vocab_size, r.data.train_shards,
                         getattr(transform, "name", type(transform).__qualname__ if transform else None))
            if signature not in datasets:
                ds = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size, transform, r.data.train_shards)
                datasets[signature] = (ds, ds.fingerprint)
            session.ctx.data, fingerprint = datasets[signature]
            reserve = 0.0
            if r.train.max_wallclock_seconds:
                reserve = float(sum(x for x in session.hook.pgolf_contribute_train_reserve_seconds(ctx=session.ctx)
                                    if x))
            run.material = stage_key_material(session, fingerprint, kind, reserve)
            run.keys = stage_keys(run.material)
    if failures and all(run.error for run in runs):
        raise failures[0]
    baseline = arms[0]
    return Plan(spec, list(spec.toggle), names, in_recipe, arms, baseline, runs, kind, notes)


# --- jobs (run in this process or in a worker) ---------------------------------------------------


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


def adopt_cached_stages(session: Any, stored: dict[str, Any], stages: tuple[Stage, ...]) -> None:
    """Carry a cached stage's hook trace and data reads into this job's session.

    Only the host's calls and those of techniques whose stage is cached are kept: they are part
    of the cached output's key, so they ran the same way for this run. Check-fired, the manifest
    and the no-leakage audit then see the whole run.
    """
    keep = {HOST_PLUGIN} | {e.name for e in session.enabled if e.stage in stages}
    trace = {plugin: {h: s for h, s in hooks.items() if h not in SESSION_HOOKS}
             for plugin, hooks in stored["trace"].items() if plugin in keep}
    session.trace.merge(trace)
    session.ctx.dataset.ledger.merge(stored["ledger"])


def check_declared_stages(enabled: list[Any], prov: Provenance) -> None:
    """Fail before anything runs when a technique implements hooks of a stage earlier than it declares."""
    for e in enabled:
        hooks = set(e.cls.hook_names())
        for stage in STAGES[:STAGES.index(e.stage)]:
            early = sorted(hooks & STAGE_HOOKS.get(stage, frozenset()))
            if early:
                raise prov.error(
                    f"techniques.{e.key}",
                    f"technique '{e.name}' declares stage '{e.stage}' but implements {', '.join(early)}, which "
                    f"change the {stage} stage; an ablation would reuse {stage} outputs made without it",
                    f"Declare stage = '{stage}' (the earliest stage it changes) on the technique.")


def _train_job(session: Any, job: Job, cache: StageCache) -> None:
    import torch

    from pgolf.lifecycle import write_json

    trained = session.train()
    with cache.writing("train", job.key) as tmp:
        torch.save({k: v.detach().cpu() for k, v in trained.model.state_dict().items()}, tmp / CHECKPOINT_FILE)
        write_json(tmp / "train.json", {"info": trained.info, "trace": session.trace.to_dict(),
                                        "ledger": session.ctx.dataset.ledger.reads, "key": job.material})


def _export_job(session: Any, job: Job, cache: StageCache) -> None:
    import torch

    from pgolf.lifecycle import write_json

    stored = cache.read_json("train", job.train_key, "train.json")
    adopt_cached_stages(session, stored, ("train",))
    state = torch.load(cache.entry("train", job.train_key) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model = session.load_checkpoint(state, stored["info"])
    exported = session.export(model, stored["info"])
    with cache.writing("export", job.key) as tmp:
        (tmp / ARTIFACT_FILE).write_bytes(exported.blob)
        write_json(tmp / "export.json", {"info": exported.info, "trace": session.trace.to_dict(),
                                         "ledger": session.ctx.dataset.ledger.reads, "key": job.material})


def _eval_job(session: Any, job: Job, cache: StageCache) -> None:
    from pgolf.lifecycle import build_result, collect_metrics, write_json

    train = cache.read_json("train", job.train_key, "train.json")
    export = cache.read_json("export", job.export_key, "export.json")
    adopt_cached_stages(session, export, ("train", "export"))  # the export trace holds the train stage's part
    blob = (cache.entry("export", job.export_key) / ARTIFACT_FILE).read_bytes()
    start = time.perf_counter()
    model = session.load_artifact(blob)
    export_info = {**export["info"], **session.bytes_info(blob)}  # code bytes of this run's techniques
    evaluated = session.evaluate(model, train["info"], export_info)
    seconds = time.perf_counter() - start
    result = build_result(session.recipe, train["info"], export_info, evaluated, collect_metrics(session))
    result.update(train=train["info"], export=export_info, eval=evaluated.info)
    ds = session.ctx.dataset
    result["data"] = {"fingerprint": ds.fingerprint, "tokenizer_sha256": _sha(ds.tokenizer_path),
                      "val_bytes_total": int(ds.val_bytes.sum()), "transform": ds.transform}
    session.check_fired()
    with cache.writing("eval", job.key) as tmp:
        write_json(tmp / "result.json", result)
        write_json(tmp / "manifest.json", session.manifest({"data": session.timings.get("data_seconds", 0.0),
                                                            "eval": seconds}))


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


STAGE_JOBS = {"train": _train_job, "export": _export_job, "eval": _eval_job}


def execute_job(job: Job) -> dict[str, Any]:
    """Produce one stage output; a failure is recorded in the cache, never raised."""
    from pgolf.lifecycle import Session
    from pgolf.reporter import Reporter

    start = time.perf_counter()
    cache = StageCache(Path(job.cache_root))
    reporter = Reporter(log_path=Path(job.log_path), quiet=True)
    reporter.log(f"== {job.stage} {job.key} for {job.label} (pid {os.getpid()})")
    try:
        session = Session(recipe_from_dict(job.recipe, Provenance(default_file=job.label)), reporter=reporter)
        session.load_data()
        STAGE_JOBS[job.stage](session, job, cache)
    except Exception as exc:  # a failing run is a result: record it and let the other runs go on
        message = exc.render() if isinstance(exc, PgolfError) else f"{type(exc).__name__}: {exc}"
        reporter.write(traceback.format_exc())
        error = {"stage": job.stage, "key": job.key, "run": job.label, "error": message,
                 "type": type(exc).__name__, "traceback": traceback.format_exc(), "log": job.log_path}
        cache.record_error(job.stage, job.key, error)
        return {"ok": False, "error": message, "seconds": time.perf_counter() - start}
    return {"ok": True, "seconds": time.perf_counter() - start}


# --- workers ------------------------------------------------------------------------------------


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
    """Spawned worker processes: each pinned to one GPU, or given its share of the CPU threads."""

    def __init__(self, workers: int, log: Log) -> None:
        self.workers = workers
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


# --- the run ------------------------------------------------------------------------------------


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


def default_out_dir(spec: AblationSpec) -> Path:
    """Deterministic, so running the same command again resumes the same ablation."""
    if spec.name:
        return Path("runs") / f"ablate-{spec.name}"
    stem = Path(spec.recipe).stem
    parts = [stem, *([spec.scale] if spec.scale else []), *spec.toggle]
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.+-]", "_", "ablate-" + "-".join(parts))


class Ablation:
    """Runs a plan: schedules the missing stage jobs, records runs as they finish, writes the summary."""

    def __init__(self, plan: Plan, out: Path, log: Log, retry_failed: bool = False) -> None:
        self.plan, self.out, self.log, self.retry_failed = plan, out, log, retry_failed
        self.cache = StageCache(out / "cache")
        self.ran: dict[Stage, set[str]] = {s: set() for s in STAGES}
        self.failed: dict[tuple[Stage, str], str] = {}  # this invocation's failures (and stored ones)
        self.records: dict[str, dict[str, Any]] = {}
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    # - jobs -

    def jobs(self) -> tuple[dict[tuple[Stage, str], Job], dict[tuple[Stage, str], tuple[Stage, str] | None]]:
        """The stage outputs still missing, each with the job it waits for."""
        jobs: dict[tuple[Stage, str], Job] = {}
        deps: dict[tuple[Stage, str], tuple[Stage, str] | None] = {}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        for run in self.plan.runs:
            if run.keys is None or self.cache.done("eval", run.keys.eval):
                continue
            previous: tuple[Stage, str] | None = None
            for stage in STAGES:
                key = run.keys.of(stage)
                if self.cache.done(stage, key):
                    previous = None
                    continue
                stored = self.cache.error(stage, key)
                if stored is not None and not self.retry_failed:
                    self.failed[(stage, key)] = stored["error"]
                    break
                self.cache.clear_error(stage, key)
                if (stage, key) not in jobs:
                    jobs[(stage, key)] = Job(stage, key, run.recipe, str(self.cache.root), run.keys.train,
                                             run.keys.export, run.material[stage], run.label,
                                             str(self.out / "logs" / f"{stage}-{key}.log"))
                    deps[(stage, key)] = previous
                previous = (stage, key)
        return jobs, deps

    def run(self, workers: int) -> dict[str, Any]:
        removed = self.cache.remove_stale_temporaries()
        if removed:
            self.log(f"removed {removed} unfinished output(s) of an interrupted earlier invocation")
        for note in self.plan.notes:
            self.log(f"note: {note}")
        jobs, deps = self.jobs()
        self.log(f"{len(self.plan.runs)} runs ({len(self.plan.arms)} arms x {len(self.plan.spec.seeds)} seeds): "
                 + ", ".join(f"{sum(1 for j in jobs if j[0] == s)} {s}" for s in STAGES) + " job(s) to do")
        self._finalize_ready()
        self._schedule(jobs, deps, workers)
        summary = self.write_summary()
        return summary

    def _schedule(self, jobs: dict[tuple[Stage, str], Job], deps: dict[tuple[Stage, str], Any], workers: int) -> None:
        pending = dict(jobs)
        order = {job_id: i for i, job_id in enumerate(jobs)}
        pool = WorkerPool(workers, self.log) if workers > 1 and len(jobs) > 1 else None
        running: dict[cf.Future, Job] = {}
        crashes: dict[tuple[Stage, str], int] = {}
        started = 0
        try:
            while pending or running:
                for job_id in [j for j in pending if deps[j] is not None and deps[j] in self.failed]:
                    dep = deps[job_id]
                    self.failed[job_id] = f"{dep[0]} failed: {self.failed[dep]}"
                    del pending[job_id]
                ready = sorted((j for j in pending if deps[j] is None or self.cache.done(*deps[j])),
                               key=lambda j: (-STAGES.index(j[0]), order[j]))  # finish runs before starting new ones
                capacity = (workers if pool else 1) - len(running)
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
                    except cf.process.BrokenProcessPool:
                        broken = True
                        crashes[job.id] = crashes.get(job.id, 0) + 1
                        if crashes[job.id] > 1:  # it was running in two pools that died: blame it
                            error = "its worker process died twice (killed, or out of memory)"
                            self.cache.record_error(job.stage, job.key, {"stage": job.stage, "key": job.key,
                                                                         "run": job.label, "error": error})
                            self._job_done(job, {"ok": False, "error": error})
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

    def _job_done(self, job: Job, outcome: dict[str, Any]) -> None:
        if outcome["ok"]:
            self.ran[job.stage].add(job.key)
            self.log(f"    {job.stage} {job.label}: done in {outcome['seconds']:.1f}s")
        else:
            self.failed[job.id] = outcome["error"]
            self.log(f"    {job.stage} {job.label}: FAILED: {outcome['error']} (log: {job.log_path})")
        self._finalize_ready()

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
                record["result"] = self.cache.read_json("eval", run.keys.eval, "result.json")
            else:
                record.update(failed_stage=stage or "plan", error=error)
            write_json_atomic(self.out / "runs" / run.record_name, record)
            self.records[run.record_name] = record
            changed = True
        if changed:
            self.write_summary()

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
        from pgolf.ablation_report import analyse

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
        summary["statistics"] = analyse(summary)
        write_json_atomic(self.out / SUMMARY_FILE, summary)
        return summary


def run_ablation(spec: AblationSpec, out: Path | None = None, *, retry_failed: bool = False,
                 log: Log = print) -> tuple[Path, dict[str, Any]]:
    """Plan, run what is missing, and return the ablation directory and its summary."""
    out = Path(out or spec.out or default_out_dir(spec))
    spec.out = str(out)
    with exclusive(out):
        plan = plan_ablation(spec)
        summary = Ablation(plan, out, log, retry_failed).run(spec.workers)
    return out, summary

"""Runs land where people look: each run's recipe, training curve and result, copied to MLflow,
TensorBoard or Weights & Biases (offline), each an optional extra (`pip install "pgolf[track]"`).

pgolf's own files stay the record and a tracker gets a copy: a tracker that fails is reported once
and dropped for the rest of the command, and the run goes on with its result.json, metrics.jsonl and
artifact unaffected. Techniques know nothing of tracking; the host and the CLI feed it.

Where the numbers come from:

* `pgolf run --track ...` feeds the trackers live, in the main rank's process: every line the
  training loop adds to metrics.jsonl is logged at its step as it is written (`TrackedMetricsLog`),
  and the result once result.json is written.
* `pgolf ablate --track ...` logs each run from its stored products, in the ablation's own process,
  as the run is recorded: the recipe as planned for its arm and seed, the curve from its training's
  cache entry (the metrics.jsonl a train job keeps, read verified) and its result.json. Worker
  processes never touch a tracker, nothing is recomputed, and a training shared by several arms
  (toggling an export or eval technique reuses it) is trained once and its curve is logged with each
  run that uses it. Adding `--track` to a finished study logs its stored runs without running
  anything; `tracked.json` in the tracking directory keeps a run from being logged twice.

Per tracked run: the resolved recipe (MLflow params with dotted keys, W&B config, TensorBoard text
and hparams), tags (command, recipe, scale, seed; for an ablation also arm and study), per step
`train/loss`, `train/lr_scale`, `train/step_avg_ms`, `train/time_ms`, `train/tokens_per_s` (and any
other number the loop logs), and the result: `val_bpb`, `val_loss`, the prequant scores, artifact
bytes, timings, `valid` and `audit/<name>` (1 passed, 0 failed).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from pgolf.context import MetricsLog
from pgolf.errors import ConfigError, suggest
from pgolf.products import write_json

Log = Callable[[str], None]


@dataclass(frozen=True)
class Backend:
    module: str  # what must import for the tracker to work
    requirement: str  # the pip requirement that installs it (as in pyproject's `track` extra)
    layout: str  # where it writes under the tracking directory, and how to look


BACKENDS: dict[str, Backend] = {
    "mlflow": Backend("mlflow", "mlflow>=2.9", "mlflow.db: mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db"),
    "tensorboard": Backend("tensorboard", "tensorboard>=2.14", "tensorboard/: tensorboard --logdir DIR/tensorboard"),
    "wandb": Backend("wandb", "wandb>=0.16", "wandb/offline-run-*: wandb sync DIR/wandb/offline-run-*"),
}
LEDGER_FILE = "tracked.json"
TRACKING_DIR = "tracking"  # the default tracking directory's name, inside the run or ablation directory
# result.json's numbers that every tracker gets (the audits, valid and techniques' metrics are added to these)
RESULT_KEYS = ("val_bpb", "val_loss", "val_bpb_prequant", "val_loss_prequant", "bytes_total", "bytes_model",
               "bytes_code", "steps", "tokens_seen", "step_avg_ms", "train_seconds", "calibration_seconds",
               "eval_seconds", "tokens_per_byte", "val_tokens", "val_bytes")


# --- choosing trackers ----------------------------------------------------------------------------


def parse_names(values: Iterable[str]) -> list[str]:
    """`--track` values (repeatable, or comma lists) -> tracker names in order, each once."""
    names: list[str] = []
    for value in values:
        for name in (part.strip().lower() for part in str(value).split(",")):
            if not name:
                continue
            if name not in BACKENDS:
                hint = suggest(name, BACKENDS) or ""
                raise ConfigError(f"--track: unknown tracker '{name}'",
                                  hint=f"{hint} Choose from: {', '.join(BACKENDS)}.".strip())
            if name not in names:
                names.append(name)
    return names


def check_installed(names: Iterable[str]) -> None:
    """Every chosen tracker's package imports here, else one error (before anything runs) with the fix."""
    missing = []
    for name in names:
        try:
            importlib.import_module(BACKENDS[name].module)
        except ImportError as exc:
            missing.append((name, exc))
    if missing:
        what = "; ".join(f"{name} ({type(exc).__name__}: {exc})" for name, exc in missing)
        requirements = " ".join(f'"{BACKENDS[name].requirement}"' for name, _ in missing)
        raise ConfigError(f"--track asks for a tracker that is not installed: {what}",
                          hint=f"Install it with: pip install {requirements} (or every tracker: "
                               f"pip install \"pgolf[track]\"), or drop it from --track.")


# --- the numbers (plain functions) ----------------------------------------------------------------


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> dotted keys (`model.num_layers`); lists stay values. An empty mapping is kept
    as `{}`, so an enabled technique with default parameters still shows."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = dict(value) if isinstance(value, Mapping) else value
    return out


def param_text(value: Any) -> str:
    """A recipe value as one parameter string: strings as they are, anything else as JSON (`null`, `true`)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def recipe_params(recipe: Mapping[str, Any]) -> dict[str, str]:
    return {key: param_text(value) for key, value in flatten(recipe).items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def step_metrics(line: Mapping[str, Any], batch_tokens: int | None) -> tuple[int, dict[str, float]] | None:
    """One metrics.jsonl line -> (step, `train/...` numbers), tokens/s derived from the step's clock.
    None for a line without a step (nothing to plot it at)."""
    step = line.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    values: dict[str, float] = {}
    for key, value in line.items():
        number = _number(value)
        if key in ("step", "time") or number is None:
            continue
        values[f"train/{key.removeprefix('train_')}"] = number
    elapsed_ms = values.get("train/time_ms")
    if batch_tokens and elapsed_ms:
        values["train/tokens_per_s"] = step * batch_tokens / (elapsed_ms / 1000.0)
    return step, values


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """result.json -> the numbers a tracker shows: scores, bytes, timings, validity and each audit."""
    out = {key: number for key in RESULT_KEYS if (number := _number(result.get(key))) is not None}
    evaluation = result.get("eval") or {}
    if (audit_seconds := _number(evaluation.get("audit_seconds"))) is not None:
        out["audit_seconds"] = audit_seconds
    if "valid" in result:
        out["valid"] = float(bool(result["valid"]))
    for name, audit in (result.get("compliance") or {}).items():
        if isinstance(audit, Mapping) and "passed" in audit:
            out[f"audit/{name}"] = float(bool(audit["passed"]))
    for key, value in flatten(result.get("metrics") or {}).items():
        if (number := _number(value)) is not None:
            out[f"metrics/{key}"] = number
    return out


def parse_metrics_lines(data: bytes | str) -> list[dict[str, Any]]:
    """metrics.jsonl's lines as objects (a line that is not a JSON object is skipped: the curve is a copy)."""
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    lines = []
    for raw in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
            if isinstance(record, dict):
                lines.append(record)
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text).strip("_") or "run"


# --- trackers ---------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """What names one tracked run: the group it belongs to, its own name, its recipe and tags."""

    experiment: str  # "pgolf" for `pgolf run`, "ablate-<study>" for an ablation's runs
    name: str
    recipe: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)


def run_info(recipe: dict[str, Any], command: str, name: str, experiment: str = "pgolf", **tags: Any) -> RunInfo:
    """A tracked run of `recipe` (a recipe's to_dict, as config.yaml holds it), tagged with what finds it again."""
    base = {"command": command, "recipe": str(recipe.get("name")), "scale": str(recipe.get("scale")),
            "seed": str(recipe.get("seed"))}
    return RunInfo(experiment, name, recipe, {**base, **{key: str(value) for key, value in tags.items()}})


class Tracker(Protocol):
    """One backend's side of a tracked run: opened by `start`, written by the two logs, closed by `finish`."""

    name: str

    def start(self, run: RunInfo) -> None: ...

    def log_step(self, step: int, values: Mapping[str, float], timestamp: float) -> None: ...

    def log_result(self, values: Mapping[str, float], step: int, result: Mapping[str, Any]) -> None: ...

    def finish(self, ok: bool) -> None: ...


class MLflowTracker:
    """MLflow's client on a SQLite store in the tracking directory (MLflow 3 keeps the plain file
    store for reading old runs only); artifacts (config.yaml, result.json) beside it."""

    name = "mlflow"
    MAX_BATCH = 100  # MLflow's limit on params (and metrics) per log_batch call
    MAX_PARAM_CHARS = 6000

    def __init__(self, directory: Path) -> None:
        from mlflow.tracking import MlflowClient

        directory.mkdir(parents=True, exist_ok=True)
        chatty = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic")]
        levels = [logger.level for logger in chatty]
        for logger in chatty:  # creating the store logs each schema step at INFO
            logger.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=f"sqlite:///{(directory / 'mlflow.db').resolve()}")
        finally:
            for logger, level in zip(chatty, levels, strict=True):
                logger.setLevel(level)
        self.artifacts = (directory / "mlartifacts").resolve()
        self.run_id: str | None = None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=(self.artifacts / _slug(name)).as_uri())
        except Exception:  # another process created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        created = self.client.create_run(self._experiment_id(run.experiment), run_name=run.name, tags=run.tags)
        self.run_id = created.info.run_id
        params = [Param(key, value[: self.MAX_PARAM_CHARS]) for key, value in recipe_params(run.recipe).items()]
        for i in range(0, len(params), self.MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.MAX_BATCH])
        self.client.log_text(self.run_id, yaml.safe_dump(run.recipe, sort_keys=False), "config.yaml")

    def _metrics(self, values: Mapping[str, float], step: int, timestamp: float) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, int(timestamp * 1000), step) for key, value in values.items()]
        for i in range(0, len(metrics), self.MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.MAX_BATCH])

    def log_step(self, step: int, values: Mapping[str, float], timestamp: float) -> None:
        self._metrics(values, step, timestamp)

    def log_result(self, values: Mapping[str, float], step: int, result: Mapping[str, Any]) -> None:
        self._metrics(values, step, time.time())
        self.client.log_dict(self.run_id, json.loads(json.dumps(result, default=str)), "result.json")  # as written

    def finish(self, ok: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        self.run_id = None


class TensorBoardTracker:
    """Event files under `tensorboard/<experiment>/<run>/` (torch's SummaryWriter): the curve and
    result as scalars, the recipe as text and as an HParams session linked to the result's scalars."""

    name = "tensorboard"

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class = SummaryWriter
        self.root = directory / "tensorboard"
        self.writer: Any = None
        self.run: RunInfo | None = None

    def start(self, run: RunInfo) -> None:
        self.run = run
        self.writer = self._writer_class(log_dir=str(self.root / _slug(run.experiment) / _slug(run.name)))
        indented = "\n".join("    " + line for line in yaml.safe_dump(run.recipe, sort_keys=False).splitlines())
        self.writer.add_text("recipe", indented)  # markdown: indented = verbatim
        self.writer.add_text("tags", "\n\n".join(f"{k}: {v}" for k, v in run.tags.items()))

    def log_step(self, step: int, values: Mapping[str, float], timestamp: float) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=timestamp)

    def log_result(self, values: Mapping[str, float], step: int, result: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        assert self.run is not None
        typed = {key: value if isinstance(value, (int, float, str, bool)) else param_text(value)
                 for key, value in flatten(self.run.recipe).items()}
        for summary in hparams(typed, dict(values)):
            self.writer.file_writer.add_summary(summary)

    def finish(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.add_text("status", "finished" if ok else "failed")
            self.writer.close()
        self.writer = self.run = None


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Environment variables set for a block, restored after it."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WandbTracker:
    """Weights & Biases in offline mode only (never the network): runs under `wandb/`, synced later
    with `wandb sync` if wanted. The recipe is the run's config, the result its summary."""

    name = "wandb"
    QUIET_SETTINGS = {"silent": True, "console": "off", "disable_git": True, "save_code": False, "disable_code": True,
                      "disable_job_creation": True, "x_disable_stats": True, "x_disable_meta": True,
                      "x_disable_machine_info": True}

    def __init__(self, directory: Path) -> None:
        with _environment(WANDB_MODE="offline"):  # as wandb reads it on import, so nothing starts online
            import wandb

        self.wandb = wandb
        self.directory = directory
        self.run: Any = None

    def _settings(self) -> Any:
        known = getattr(self.wandb.Settings, "model_fields", None)  # older releases: no x_ settings, no listing
        quiet = {k: v for k, v in self.QUIET_SETTINGS.items() if (k in known if known else not k.startswith("x_"))}
        return self.wandb.Settings(mode="offline", **quiet)

    def start(self, run: RunInfo) -> None:
        where = self.directory.resolve()
        where.mkdir(parents=True, exist_ok=True)
        tags = [f"{key}:{value}"[:64] for key, value in run.tags.items()]  # W&B's tag length limit
        with _environment(WANDB_MODE="offline", WANDB_DIR=str(where)):
            self.run = self.wandb.init(dir=str(where), project="pgolf", group=run.experiment,
                                       job_type=run.tags.get("command"), name=run.name, config=run.recipe, tags=tags,
                                       settings=self._settings())

    def log_step(self, step: int, values: Mapping[str, float], timestamp: float) -> None:
        self.run.log(dict(values), step=step)

    def log_result(self, values: Mapping[str, float], step: int, result: Mapping[str, Any]) -> None:
        self.run.summary.update(dict(values))

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
        self.run = None


TRACKER_CLASSES: dict[str, Callable[[Path], Tracker]] = {
    "mlflow": MLflowTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}


# --- one command's trackers ---------------------------------------------------------------------------


class Tracking:
    """The trackers one command logs to, all at once, one run at a time. Every call into a tracker
    is guarded: one that raises is reported once and dropped, and the run goes on."""

    def __init__(self, directory: Path, trackers: list[Tracker], log: Log = print) -> None:
        self.directory = Path(directory)
        self.trackers = list(trackers)
        self.log = log
        self.active: list[Tracker] = []
        self.batch_tokens: int | None = None
        self.last_step = 0

    @classmethod
    def open(cls, names: Iterable[str], directory: Path, log: Log = print) -> Tracking:
        """The named trackers writing under `directory` (check_installed first for the friendlier error)."""
        names = list(names)
        check_installed(names)
        trackers = []
        for name in names:
            try:
                trackers.append(TRACKER_CLASSES[name](Path(directory)))
            except Exception as exc:
                raise ConfigError(f"--track {name}: cannot open its store under {directory} "
                                  f"({type(exc).__name__}: {exc})",
                                  hint="Pass another --track-dir, or drop it from --track.") from exc
        log(f"tracking: {', '.join(names)} -> {directory} "
            f"({'; '.join(BACKENDS[n].layout.replace('DIR', str(directory)) for n in names)})")
        return cls(Path(directory), trackers, log)

    def _each(self, action: str, call: Callable[[Tracker], None], trackers: list[Tracker] | None = None) -> None:
        for tracker in list(self.active if trackers is None else trackers):
            try:
                call(tracker)
            except Exception as exc:
                self.log(f"warning: tracker {tracker.name} failed while {action} ({type(exc).__name__}: {exc}); "
                         "it is dropped for the rest of this command, pgolf's own files are unaffected")
                for group in (self.trackers, self.active):
                    if tracker in group:
                        group.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.finish(False)

    def start(self, run: RunInfo, trackers: list[Tracker] | None = None) -> None:
        self.active = list(self.trackers if trackers is None else trackers)
        train = run.recipe.get("train") or {}
        self.batch_tokens = train.get("batch_tokens") if isinstance(train, Mapping) else None
        self.last_step = 0
        self._each("starting a run", lambda t: t.start(run))

    def log_step(self, line: Mapping[str, Any]) -> None:
        """One metrics.jsonl line."""
        parsed = step_metrics(line, self.batch_tokens)
        if parsed is None or not self.active:
            return
        step, values = parsed
        self.last_step = max(self.last_step, step)
        timestamp = _number(line.get("time")) or time.time()
        self._each(f"logging step {step}", lambda t: t.log_step(step, values, timestamp))

    def log_result(self, result: Mapping[str, Any]) -> None:
        values = result_metrics(result)
        step = int(result.get("steps") or self.last_step)
        self._each("logging the result", lambda t: t.log_result(values, step, result))

    def finish(self, ok: bool) -> None:
        self._each("finishing a run", lambda t: t.finish(ok))
        self.active = []

    @contextlib.contextmanager
    def run(self, run: RunInfo) -> Iterator[Tracking]:
        """A tracked run around a block: finished as failed when the block raises."""
        self.start(run)
        try:
            yield self
        except BaseException:
            self.finish(False)
            raise
        self.finish(True)

    def metrics_log(self, inner: MetricsLog) -> TrackedMetricsLog:
        """The run's metrics log, each line also handed to the trackers (what `pgolf run` trains with)."""
        return TrackedMetricsLog(inner.path, self)

    # - ablations: runs logged from their stored products -

    def _ledger(self) -> dict[str, list[str]]:
        try:
            payload = json.loads((self.directory / LEDGER_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return {}
        runs = payload.get("runs") if isinstance(payload, dict) else None
        return runs if isinstance(runs, dict) else {}

    def log_stored(self, key: str, run: RunInfo, metrics: bytes | str, result: Mapping[str, Any] | None,
                   ok: bool) -> None:
        """Log one finished run (its curve from a stored metrics.jsonl, its stored result) to every
        tracker that has not logged `key` before."""
        ledger = self._ledger()
        done = set(ledger.get(key, []))
        todo = [t for t in self.trackers if t.name not in done]
        if not todo:
            return
        self.start(run, todo)
        for line in parse_metrics_lines(metrics):
            self.log_step(line)
        if result is not None:
            self.log_result(result)
        logged = [t.name for t in self.active]
        self.finish(ok)
        logged = [name for name in logged if any(t.name == name for t in self.trackers)]
        if logged:
            ledger = self._ledger()
            ledger[key] = sorted(set(ledger.get(key, [])) | set(logged))
            write_json(self.directory / LEDGER_FILE, {"runs": ledger})


class TrackedMetricsLog(MetricsLog):
    """metrics.jsonl exactly as before; each line is then handed to the trackers (whose failures stay theirs)."""

    def __init__(self, path: Path | None, tracking: Tracking) -> None:
        super().__init__(path)
        self.tracking = tracking

    def log(self, **values: Any) -> None:
        super().log(**values)
        self.tracking.log_step({"time": time.time(), **values})

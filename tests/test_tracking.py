"""Tracking (`--track mlflow|tensorboard|wandb`): a micro run and a micro ablation logged to every
installed tracker, read back with each library's own reader and compared to pgolf's own files.

Each tracker's test is skipped when its package is absent (`pip install "pgolf[track]"`). W&B runs
offline only: nothing here reaches the network."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.context import MetricsLog
from pgolf.tracking import (
    BACKENDS,
    LEDGER_FILE,
    RunInfo,
    TrackedMetricsLog,
    Tracking,
    flatten,
    parse_names,
    result_metrics,
    step_metrics,
)
from tests.conftest import MICRO, REPO, pinned_threads

# MLflow's SQLAlchemy store trips a SQLAlchemy deprecation inside MLflow: not ours to act on
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.store.tracking.sqlalchemy_store")

INSTALLED = [name for name, backend in BACKENDS.items() if importlib.util.find_spec(backend.module) is not None]


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(name not in INSTALLED, reason=f"{name} is not installed (pip install \"pgolf[track]\")")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """W&B stays offline and quiet whatever the caller's environment says."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def sets(items: list[str]) -> list[str]:
    return [flag for item in items for flag in ("--set", item)]


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    """TensorBoard keeps float32."""
    return a == pytest.approx(b, rel=rel)


# --- the numbers ---------------------------------------------------------------------------------


def test_track_names_parse_repeated_and_comma_lists_and_reject_unknown_ones():
    from pgolf.errors import ConfigError

    assert parse_names(["mlflow,tensorboard", "wandb", "MLflow", ""]) == ["mlflow", "tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="Did you mean 'tensorboard'"):
        parse_names(["tensorbord"])


def test_step_and_result_metrics_copy_what_the_run_wrote():
    line = {"time": 1.5, "step": 4, "train_loss": 6.5, "train_time_ms": 2000, "step_avg_ms": 500.0, "lr_scale": 0.5}
    step, values = step_metrics(line, batch_tokens=1024)
    assert step == 4 and values == {"train/loss": 6.5, "train/time_ms": 2000.0, "train/step_avg_ms": 500.0,
                                    "train/lr_scale": 0.5, "train/tokens_per_s": 4 * 1024 / 2.0}
    assert step_metrics({"time": 1.0, "note": "no step"}, 1024) is None
    result = {"val_bpb": 2.5, "val_loss": 4.0, "bytes_total": 100, "steps": 4, "valid": False,
              "eval": {"audit_seconds": 0.25}, "metrics": {"ttt": {"chunks": 3}, "label": "x"},
              "compliance": {"normalization": {"passed": True}, "time_budget": {"passed": False}}}
    assert result_metrics(result) == {"val_bpb": 2.5, "val_loss": 4.0, "bytes_total": 100.0, "steps": 4.0,
                                      "audit_seconds": 0.25, "valid": 0.0, "audit/normalization": 1.0,
                                      "audit/time_budget": 0.0, "metrics/ttt.chunks": 3.0}
    assert flatten({"model": {"num_layers": 2}, "techniques": {"ema": {}}}) == {"model.num_layers": 2,
                                                                                "techniques.ema": {}}


class Recording:
    """A tracker that keeps what it was given."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def start(self, run):
        self.calls.append(("start", run.name))

    def log_step(self, step, values, timestamp):
        self.calls.append(("step", step, values["train/loss"]))

    def log_result(self, values, step, result):
        self.calls.append(("result", step, values["val_bpb"]))

    def finish(self, ok):
        self.calls.append(("finish", ok))


class FailsAtStep(Recording):
    """A tracker whose store breaks mid-run (disk full, server gone)."""

    name = "breaks"

    def log_step(self, step, values, timestamp):
        if step == 2:
            raise OSError("No space left on device")
        super().log_step(step, values, timestamp)


def test_a_tracker_failing_mid_run_is_dropped_and_the_run_keeps_its_files(tmp_path):
    warnings: list[str] = []
    fine, broken = Recording(), FailsAtStep()
    tracking = Tracking(tmp_path / "tracking", [broken, fine], log=warnings.append)
    metrics = tracking.metrics_log(MetricsLog(tmp_path / "metrics.jsonl"))
    assert isinstance(metrics, TrackedMetricsLog)
    with tracking.run(RunInfo("pgolf", "r", {"train": {"batch_tokens": 8}})):
        for step in (1, 2, 3):
            metrics.log(step=step, train_loss=10.0 - step, train_time_ms=100 * step)
        tracking.log_result({"val_bpb": 1.25, "steps": 3})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # the run's own file has every line
    assert fine.calls == [("start", "r"), ("step", 1, 9.0), ("step", 2, 8.0), ("step", 3, 7.0), ("result", 3, 1.25),
                          ("finish", True)]
    assert broken.calls == [("start", "r"), ("step", 1, 9.0), ("finish", False)]  # closed as failed, then left alone
    assert len(warnings) == 1 and "tracker breaks failed while logging step 2" in warnings[0]
    assert "No space left on device" in warnings[0] and tracking.trackers == [fine]


def test_a_missing_tracker_package_is_one_paragraph_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "baseline.yaml"), "--scale", "tiny",
                                      "--out", str(out), "--track", "tensorboard", "--track", "wandb"])
    assert result.exit_code == 2, result.output
    assert 'pip install "wandb>=0.16"' in result.stderr and "Traceback" not in result.output
    assert not out.exists()
    ablate = CliRunner().invoke(app, ["ablate", str(REPO / "recipes" / "baseline.yaml"), "--toggle", "ema",
                                      "--out", str(tmp_path / "study"), "--track", "wandb"])
    assert ablate.exit_code == 2 and 'pip install "wandb>=0.16"' in ablate.stderr
    assert not (tmp_path / "study").exists()


# --- a run through the CLI, read back ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """`pgolf run --track <every installed tracker>` at micro size: its directory, result and curve."""
    if not INSTALLED:
        pytest.skip("no tracker is installed (pip install \"pgolf[track]\")")
    out = tmp_path_factory.mktemp("tracked") / "run"
    with pytest.MonkeyPatch.context() as env, pinned_threads():
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        result = CliRunner().invoke(app, ["run", str(REPO / "recipes" / "baseline.yaml"), "--scale", "tiny",
                                          *sets(MICRO), "--out", str(out), "--track", ",".join(INSTALLED)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    return {"out": out, "result": json.loads((out / "result.json").read_text()), "lines": lines,
            "config": yaml.safe_load((out / "config.yaml").read_text())}


@pytest.mark.slow
@needs("mlflow")
def test_mlflow_holds_the_recipe_the_curve_and_the_result(tracked):
    from mlflow.tracking import MlflowClient

    out, result, lines = tracked["out"], tracked["result"], tracked["lines"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pgolf").experiment_id])
    assert run.info.run_name == out.name and run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("command", "recipe", "scale", "seed")} == {
        "command": "run", "recipe": "baseline", "scale": "tiny", "seed": str(result["seed"])}
    config = tracked["config"]
    assert set(run.data.params) == set(flatten(config))  # every leaf of config.yaml, nothing else
    assert run.data.params["model.num_layers"] == str(config["model"]["num_layers"]) == "2"
    assert run.data.params["data.dir"] == "null" and run.data.params["name"] == "baseline"
    for key, field in (("train/loss", "train_loss"), ("train/lr_scale", "lr_scale"), ("train/time_ms", "train_time_ms")):
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(x["step"], x[field]) for x in lines], key
    speed = client.get_metric_history(run.info.run_id, "train/tokens_per_s")
    assert [m.step for m in speed] == [1, 2, 3] and speed[-1].value == pytest.approx(
        3 * config["train"]["batch_tokens"] / (lines[-1]["train_time_ms"] / 1000))
    metrics = run.data.metrics
    for key in ("val_bpb", "val_loss", "val_bpb_prequant", "bytes_total", "bytes_model", "eval_seconds"):
        assert metrics[key] == result[key], key
    assert metrics["valid"] == float(result["valid"]) == 1.0
    assert {k.removeprefix("audit/") for k in metrics if k.startswith("audit/")} == set(result["compliance"])
    assert client.get_metric_history(run.info.run_id, "val_bpb")[0].step == result["steps"]
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(out / "dl"))).read_text())
    assert stored["val_bpb"] == result["val_bpb"]


@pytest.mark.slow
@needs("tensorboard")
def test_tensorboard_events_hold_the_curve_and_the_result(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result, lines = tracked["out"], tracked["result"], tracked["lines"]
    events = EventAccumulator(str(out / "tracking" / "tensorboard" / "pgolf" / out.name))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr_scale", "train/step_avg_ms", "train/tokens_per_s", "val_bpb", "valid"} <= scalars
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [x["step"] for x in lines]
    assert all(close(e.value, x["train_loss"]) for e, x in zip(loss, lines, strict=True))
    for key in ("val_bpb", "val_loss", "bytes_total"):
        (point,) = events.Scalars(key)
        assert point.step == result["steps"] and close(point.value, result[key]), key
    assert "recipe/text_summary" in events.Tags()["tensors"]


def wandb_records(run_dir: Path, *flags: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(run_dir), "--json", *flags],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "No such command" in proc.stderr:
        pytest.skip("this wandb has no offline-run reader (`wandb leet inspect`)")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
@needs("wandb")
def test_wandb_offline_run_holds_the_config_the_history_and_the_summary(tracked):
    out, result, lines = tracked["out"], tracked["result"], tracked["lines"]
    (run_dir,) = sorted((out / "tracking" / "wandb").glob("offline-run-*"))
    summary = json.loads(wandb_records(run_dir, "--summary"))
    assert summary["name"] == out.name and summary["state"] == "finished"
    assert summary["config"]["model"] == tracked["config"]["model"] and summary["config"]["seed"] == result["seed"]
    assert {"command:run", "recipe:baseline", f"seed:{result['seed']}"} <= set(summary["tags"])
    for key in ("val_bpb", "val_loss", "bytes_total"):
        assert summary["summary"][key] == pytest.approx(result[key]), key
    assert summary["summary"]["valid"] == summary["summary"]["audit/causality"] == 1.0 and result["valid"]
    records = [json.loads(x) for x in wandb_records(run_dir).splitlines() if x.strip()]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    assert [h["_step"] for h in history] == [x["step"] for x in lines]
    assert [h["train/loss"] for h in history] == [x["train_loss"] for x in lines]


# --- an ablation: each run from its stored products --------------------------------------------------


@pytest.mark.slow
@needs("mlflow")
def test_each_ablation_run_is_tracked_once_from_its_stored_products(tmp_path):
    """Each arm x seed is its own tracked run, tagged with both; the training both arms share is
    logged with each; a study tracked after it ran logs its stored runs, once."""
    from mlflow.tracking import MlflowClient

    from pgolf.study.cache import StageCache
    from pgolf.study.jobs import METRICS_FILE
    from pgolf.study.scheduler import run_ablation
    from pgolf.study.spec import AblationSpec
    from tests.ablation_techniques import MODULE

    stride = f"{MODULE}:HalfStride"  # an eval toggle: both arms share one training
    recipe = tmp_path / "study.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "baseline.yaml"), "name": "study"}))
    spec = AblationSpec(recipe=str(recipe), toggle=[stride], seeds=[1], scale="tiny", set=list(MICRO))
    out = tmp_path / "study"
    with pinned_threads():
        _, summary = run_ablation(spec, out, log=lambda _: None)  # untracked: tracked later from what it stored
        for _ in range(2):  # the first logs both runs without running anything; the second logs nothing again
            _, again = run_ablation(AblationSpec(**spec.to_dict()), out, log=lambda _: None, track=["mlflow"])
            assert sum(again["counts"][stage]["ran"] for stage in ("train", "export", "eval")) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(f"ablate-{out.name}").experiment_id])
    assert sorted((r.data.tags["arm"], r.data.tags["seed"]) for r in runs) == [("none", "1"), (stride, "1")]
    by_arm = {r["arm"]: r for r in summary["runs"]}
    (train_key,) = {r["keys"]["train"] for r in summary["runs"]}
    stored = [json.loads(x) for x in StageCache(out / "cache").read_bytes("train", train_key, METRICS_FILE).splitlines()]
    for run in runs:
        record = by_arm[run.data.tags["arm"]]
        assert run.info.status == "FINISHED" and run.data.tags["command"] == "ablate"
        assert run.data.metrics["val_bpb"] == record["result"]["val_bpb"]
        assert run.data.params["seed"] == "1"
        assert run.data.params.get(f"techniques.{stride}") == ("{}" if record["arm"] == stride else None)
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in history] == [(x["step"], x["train_loss"]) for x in stored]
    ledger = json.loads((out / "tracking" / LEDGER_FILE).read_text())["runs"]
    assert len(ledger) == 2 and all(names == ["mlflow"] for names in ledger.values())

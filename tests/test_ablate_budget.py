"""`pgolf ablate --plan`, `--max-usd` and `--stop-when-decided` on real micro studies, and the stopping
rule against scipy's own Welch test on every outcome it claims to cover."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.study import stats
from pgolf.study.budget import (
    JOB_SECONDS_FILE,
    ArmScores,
    _p_bounds,
    all_decided,
    decide,
    decided_verdict,
    plausible_box,
    plausible_spread,
    pooled_std,
    project,
)
from pgolf.study.cache import StageCache
from pgolf.study.plan import plan_ablation
from pgolf.study.spec import load_spec
from tests.ablation_techniques import MODULE
from tests.conftest import MICRO
from tests.test_ablate import micro_spec, write_recipe

SHRINK, STRIDE, RESERVE = f"{MODULE}:Shrink", f"{MODULE}:HalfStride", f"{MODULE}:Reserve"
MICRO_FLAGS = [flag for item in MICRO for flag in ("--set", item)]


def ablate(folder: Path, *args: str, toggle: str = STRIDE, seeds: str = "1", techniques: dict | None = None):
    """`pgolf ablate` on a micro study in `folder` (its ablation directory is folder/ablation)."""
    recipe = write_recipe(folder, techniques)
    command = ["ablate", str(recipe), "--toggle", toggle, "--seeds", seeds, "--scale", "tiny",
               "--out", str(folder / "ablation"), *MICRO_FLAGS, *args]
    return CliRunner().invoke(app, command)


def plan_json(folder: Path, *args: str, **kwargs) -> dict:
    result = ablate(folder, "--plan", "--format", "json", *args, **kwargs)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def listing(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# --- projection without running (planning only) ----------------------------------------------------------


def test_plan_on_a_fresh_directory_lists_every_job_and_runs_nothing(tmp_path):
    projection = plan_json(tmp_path, "--gpu-hour-usd", "2", seeds="1,2")
    assert not (tmp_path / "ablation").exists()  # nothing trained, nothing written, not even the directory
    assert projection["to_run"] == {"train": 2, "export": 2, "eval": 4}
    assert projection["cached"] == {"train": 0, "export": 0, "eval": 0}
    outputs = projection["outputs"]
    assert all(o["state"] == "run" for o in outputs) and len(outputs) == 8
    trains = [o for o in outputs if o["stage"] == "train"]
    assert all(o["seconds"] is None and o["source"].startswith("unknown: step-matched") for o in trains)
    evals = [o for o in outputs if o["stage"] == "eval"]
    assert all(o["seconds"] == 600.0 and o["source"] == "cap: eval.max_seconds 600 s" for o in evals)
    assert projection["seconds"] == 2400.0 and projection["unknown_jobs"] == 4 and not projection["complete"]
    assert projection["usd"] == pytest.approx(2400 / 3600 * 2)  # the known part only; `complete` says so
    # each training job is shared by both arms of its seed (the eval-stage toggle re-scores the same artifact)
    assert sorted(len(o["runs"]) for o in trains) == [2, 2]

    text = ablate(tmp_path, "--plan", seeds="1,2")
    assert text.exit_code == 0 and "to run: 2 train, 2 export, 4 eval job(s)" in text.stdout
    assert "4 job(s) of unknown time" in text.stdout and not (tmp_path / "ablation").exists()


def test_capped_jobs_are_charged_the_caps_and_time_becomes_money(tmp_path):
    capped = ("--set", "train.max_wallclock_seconds=60", "--set", "eval.max_seconds=30")
    projection = plan_json(tmp_path, *capped, "--gpu-hour-usd", "3", "--gpus-per-job", "8",
                           techniques={RESERVE: {"seconds": 5.0}})
    by_stage = {o["stage"]: o for o in projection["outputs"]}
    assert by_stage["train"]["seconds"] == 55.0  # the loop stops at the cap less the reserve ...
    assert "less the 5 s calibration reserve" in by_stage["train"]["source"]
    assert by_stage["export"]["seconds"] == 5.0  # ... which the export job's calibration spends
    assert by_stage["eval"]["seconds"] == 30.0
    assert projection["complete"] and projection["seconds"] == 55 + 5 + 2 * 30
    assert projection["gpu_hours"] == pytest.approx(120 * 8 / 3600)
    assert projection["usd"] == pytest.approx(120 * 8 / 3600 * 3)


def test_a_stored_failure_is_listed_and_costs_nothing_unless_retried(tmp_path):
    spec = micro_spec(tmp_path, [STRIDE])
    plan = plan_ablation(spec)
    out = tmp_path / "ablation"
    train_key = plan.runs[0].keys.train
    StageCache(out / "cache").record_error("train", train_key, {"error": "boom: out of memory"})
    projection = project(plan, StageCache(out / "cache"), out)
    assert [(o.stage, o.state) for o in projection.outputs] == [("train", "failed")]  # its later stages wait
    assert projection.seconds == 0.0 and "boom" in projection.outputs[0].error
    retried = project(plan, StageCache(out / "cache"), out, retry_failed=True)
    assert [o.state for o in retried.outputs] == ["run"] * 4
    assert (out / "cache" / "train" / f"{train_key}.error.json").is_file()  # projecting cleared nothing


def test_max_usd_refuses_an_expensive_study_with_exit_2_and_runs_nothing(tmp_path):
    capped = ("--set", "train.max_wallclock_seconds=60", "--set", "eval.max_seconds=30")
    result = ablate(tmp_path, *capped, "--gpu-hour-usd", "3", "--gpus-per-job", "8", "--max-usd", "0.5")
    assert result.exit_code == 2, result.output
    error = result.stderr  # 60 s training + 0 s export + 2 x 30 s eval, x 8 GPUs at $3/GPU-hour
    assert "Traceback" not in result.output and "projected to cost $0.80" in error and "--max-usd 0.5" in error
    assert "nothing was run" in error and not (tmp_path / "ablation").exists()

    within = ablate(tmp_path, *capped, "--gpu-hour-usd", "3", "--gpus-per-job", "8", "--max-usd", "2", "--plan")
    assert within.exit_code == 0, within.output


def test_max_usd_refuses_a_study_of_unknown_cost_and_says_why(tmp_path):
    unknown = ablate(tmp_path, "--gpu-hour-usd", "2", "--max-usd", "100")
    assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    assert "have no projected time (step-matched training has no wallclock cap" in unknown.stderr
    assert "Run one seed first" in unknown.stderr and not (tmp_path / "ablation").exists()
    unpriced = ablate(tmp_path, "--max-usd", "100", "--plan")
    assert unpriced.exit_code == 2 and "needs gpu_hour_usd (--gpu-hour-usd" in unpriced.stderr


def test_a_spec_file_holds_the_budget_fields_and_flags_win(tmp_path):
    recipe = write_recipe(tmp_path)
    path = tmp_path / "budgeted.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "toggle": [STRIDE], "gpu_hour_usd": 2.5, "max_usd": 10,
                                    "gpus_per_job": 8, "stop_when_decided": True}))
    spec = load_spec(path, {"max_usd": 4.0, "stop_when_decided": None})
    assert (spec.gpu_hour_usd, spec.max_usd, spec.gpus_per_job, spec.stop_when_decided) == (2.5, 4.0, 8, True)
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "toggle": [STRIDE], "gpus_per_job": 0}))
    with pytest.raises(Exception, match="gpus_per_job must be at least 1"):
        load_spec(path, {})


# --- after running: cached outputs and measured seconds ----------------------------------------------------


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """A finished one-seed micro study (one training, one export, two evaluations)."""
    folder = tmp_path_factory.mktemp("ran")
    result = ablate(folder, "--format", "json")
    assert result.exit_code == 0, result.output
    return folder


@pytest.mark.slow
def test_after_running_the_plan_lists_everything_cached_and_costs_nothing(ran):
    before = listing(ran / "ablation")
    projection = plan_json(ran, "--gpu-hour-usd", "2", "--max-usd", "0")
    assert projection["to_run"] == {"train": 0, "export": 0, "eval": 0}
    assert {o["state"] for o in projection["outputs"]} == {"cached"} and projection["cached"]["eval"] == 2
    assert projection["seconds"] == 0.0 and projection["usd"] == 0.0 and projection["complete"]
    assert listing(ran / "ablation") == before  # verified, not touched


@pytest.mark.slow
def test_measured_seconds_of_another_seed_replace_the_caps(ran):
    recorded = json.loads((ran / "ablation" / JOB_SECONDS_FILE).read_text())
    projection = plan_json(ran, "--gpu-hour-usd", "2", "--max-usd", "1", seeds="1,2")
    new = [o for o in projection["outputs"] if o["state"] == "run"]
    assert sorted(o["stage"] for o in new) == ["eval", "eval", "export", "train"]  # seed 2's jobs
    for output in new:
        assert output["source"] == "measured: job time of seed 1"
        seed_one = [e["seconds"] for e in recorded[output["stage"]].values() if e["seed"] == 1]
        assert output["seconds"] in seed_one
    assert projection["complete"] and projection["seconds"] == pytest.approx(sum(o["seconds"] for o in new))

    hidden = ran / "ablation" / JOB_SECONDS_FILE
    hidden.rename(hidden.with_suffix(".aside"))
    try:  # outputs made without the record fall back to the stage timings stored with them
        projection = plan_json(ran, seeds="1,2")
    finally:
        hidden.with_suffix(".aside").rename(hidden)
    train = next(o for o in projection["outputs"] if o["stage"] == "train" and o["state"] == "run")
    assert train["source"] == "measured: stage timings of seed 1"
    cache = StageCache(ran / "ablation" / "cache")
    (key,) = [p.name for p in (cache.root / "train").iterdir() if p.is_dir()]
    info = cache.read_json("train", key, "train.json")["info"]
    assert train["seconds"] == pytest.approx(info["warmup_seconds"] + info["train_seconds"] + info["averaging_seconds"])


# --- the stopping rule ------------------------------------------------------------------------------------

# val_bpb of two finished seeds per arm of the micro study below (none, shrink x0.5): measured on CPU
BASE, WORSE = (3.54612, 3.54510), (3.55495, 3.55321)
TPB = 0.356


def outcomes(arm: ArmScores, box: tuple[float, float]) -> list[tuple[float, ...]]:
    """Every way the arm's remaining seeds may return on a grid over the box: fail, or land somewhere in it."""
    grid = [*np.linspace(box[0], box[1], 5), float(np.mean(arm.values))]
    return [arm.values + extra for r in range(arm.remaining + 1) for extra in itertools.product(grid, repeat=r)]


def every_verdict(new: ArmScores, old: ArmScores) -> set[tuple[bool, bool | None]]:
    """The table's (practice, rule) verdicts over every outcome on the grid of `decide`'s boxes, by scipy."""
    pooled = pooled_std([old, new])
    margin = stats.nats_to_bpb(stats.RULE_MARGIN_NATS, TPB)
    seen = set()
    for a in outcomes(new, plausible_box(new, plausible_spread(new, pooled))):
        for b in outcomes(old, plausible_box(old, plausible_spread(old, pooled))):
            v = stats.verdicts(stats.welch(a, b).p_value, stats.welch(a, b, margin=margin).p_value)
            seen.add((v["practice"], v["rule"]))
    return seen


def test_a_verdict_far_from_its_threshold_is_decided_and_every_outcome_agrees():
    old, new = ArmScores(BASE, 1, TPB), ArmScores(WORSE, 1, TPB)
    verdicts = decide(old, {"shrink": new})
    assert verdicts == {"shrink": {"practice": False, "rule": False}} and all_decided(verdicts)
    assert every_verdict(new, old) == {(False, False)}


def test_a_verdict_near_its_threshold_is_not_decided_because_an_outcome_flips_it():
    old, new = ArmScores((1.0000, 1.0020), 1, TPB), ArmScores((0.9990, 1.0010), 1, TPB)
    verdicts = decide(old, {"close": new})
    assert verdicts["close"]["practice"] is None and not all_decided(verdicts)
    assert {practice for practice, _ in every_verdict(new, old)} == {True, False}  # stopping now would be wrong


def test_a_clear_improvement_is_decided_for_both_conventions():
    old = ArmScores((1.2000, 1.2004, 1.1998), 1, TPB)
    new = ArmScores((1.1000, 1.1003, 1.0999), 2, TPB)
    assert decide(old, {"better": new}) == {"better": {"practice": True, "rule": True}}
    assert every_verdict(new, old) == {(True, True)}


def test_one_finished_seed_decides_nothing_and_no_remaining_seed_leaves_the_tables_verdict():
    assert decided_verdict(ArmScores((1.1,), 2), ArmScores((1.2, 1.2001), 1), 0.0, 0.25, 0.01, 0.01) is None
    new, old = ArmScores((1.101, 1.099), 0, TPB), ArmScores((1.102, 1.100), 0, TPB)
    table = stats.compare(list(new.values), list(old.values), tokens_per_byte=TPB).verdicts
    assert decide(old, {"done": new}) == {"done": table}


def test_the_p_value_bounds_hold_scipys_p_for_every_outcome():
    rng = np.random.default_rng(7)
    for _ in range(100):
        x_new, x_old = rng.normal(1.1, 0.01, rng.integers(2, 4)), rng.normal(1.1, 0.01, rng.integers(2, 4))
        add_new, add_old = int(rng.integers(0, 3)), int(rng.integers(0, 3))
        margin = float(rng.choice([0.0, 0.003]))
        box_new = (x_new.min() - 0.02, x_new.max() + 0.02)
        box_old = (x_old.min() - 0.02, x_old.max() + 0.02)
        bounds = _p_bounds((x_new, add_new, box_new), (x_old, add_old, box_old), margin)
        assert bounds is not None
        for _ in range(10):
            a = [*x_new, *rng.uniform(*box_new, add_new)]
            b = [*x_old, *rng.uniform(*box_old, add_old)]
            p = stats.welch(a, b, margin=margin).p_value
            assert bounds[0] - 1e-12 <= p <= bounds[1] + 1e-12
        assert math.isfinite(bounds[0]) and bounds[0] <= bounds[1]


@pytest.mark.slow
def test_stop_when_decided_skips_the_last_seed_of_a_study_decided_after_two(tmp_path):
    result = ablate(tmp_path, "--stop-when-decided", "--format", "md", toggle=SHRINK, seeds="1,2,3",
                    techniques={SHRINK: {"factor": 0.5}})
    assert result.exit_code == 0, result.output  # skipped runs are not failures
    summary = json.loads((tmp_path / "ablation" / "summary.json").read_text())
    status = {(r["arm"], r["seed"]): r["status"] for r in summary["runs"]}
    assert status == {("none", 1): "ok", ("none", 2): "ok", ("none", 3): "skipped",
                      (SHRINK, 1): "ok", (SHRINK, 2): "ok", (SHRINK, 3): "skipped"}
    assert summary["counts"]["train"] == {"ran": 4, "reused": 0}
    stopped = summary["stopped_when_decided"]
    assert stopped["skipped"] == ["none seed 3", f"{SHRINK} seed 3"]
    assert stopped["verdicts"] == {SHRINK: {"practice": False, "rule": False}}
    record = json.loads((tmp_path / "ablation" / "runs" / "none-seed3.json").read_text())
    assert record["status"] == "skipped" and "already decided" in record["reason"]
    assert "stopped when decided" in result.stdout and "skipped: none seed 3" in result.stdout
    shrink = next(a for a in summary["statistics"]["arms"] if a["id"] == SHRINK)
    assert shrink["comparison"]["verdicts"] == stopped["verdicts"][SHRINK]  # the table agrees with the decision
    from pgolf.study.report import load_summary

    assert any(w.startswith("stopped when decided") for w in load_summary(tmp_path / "ablation")["statistics"]["warnings"])

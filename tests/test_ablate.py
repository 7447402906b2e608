"""`pgolf ablate` at micro scale: arms, stage keys, the stage-aware cache (counted), failures, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.errors import ConfigError, PgolfError
from pgolf.host import run as run_recipe
from pgolf.reporter import Reporter
from pgolf.study.designs import Arm, design_arms
from pgolf.study.plan import plan_ablation
from pgolf.study.scheduler import run_ablation
from pgolf.study.spec import AblationSpec, is_spec_file, load_spec
from tests.ablation_techniques import MODULE
from tests.conftest import MICRO, REPO

SHRINK, BITS, STRIDE = f"{MODULE}:Shrink", f"{MODULE}:FewerBits", f"{MODULE}:HalfStride"
FAILS, RESERVE, MISDECLARED = f"{MODULE}:FailsUntilFileExists", f"{MODULE}:Reserve", f"{MODULE}:MisdeclaredEval"
QUIET = Reporter(quiet=True)


def write_recipe(folder: Path, techniques: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "baseline.yaml"), "name": "study",
                                    "techniques": techniques or {}}))
    return path


def micro_spec(folder: Path, toggles: list[str], seeds=(1,), techniques: dict | None = None, sets=(), **fields):
    return AblationSpec(recipe=str(write_recipe(folder, techniques)), toggle=list(toggles), seeds=list(seeds),
                        scale="tiny", set=[*MICRO, *sets], **fields)


def silent(_message: str) -> None:
    """The runner's progress lines are not under test."""


def by_arm_seed(summary: dict) -> dict[tuple[str, int], dict]:
    return {(r["arm"], r["seed"]): r for r in summary["runs"]}


# --- arms and keys (no training) -------------------------------------------------------------------


def test_designs_list_their_arms_baseline_first():
    t = ["a", "b", "c"]
    assert [a.on for a in design_arms(t, "factorial", ())] == [
        (), ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert [a.on for a in design_arms(t, "one-at-a-time", ())] == [(), ("a",), ("b",), ("c",)]
    assert [a.on for a in design_arms(t, "one-at-a-time", ("a", "b"))] == [("a", "b"), ("b",), ("a",), ("a", "b", "c")]
    assert [a.on for a in design_arms(t, "leave-one-out", ())] == [(), ("a", "b", "c"), ("b", "c"), ("a", "c"),
                                                                   ("a", "b")]
    assert [a.on for a in design_arms(t, "leave-one-out", ("a", "b", "c"))][0] == ("a", "b", "c")
    assert Arm(()).id == "none" and Arm(("x:Y",)).slug == "x_Y"


@pytest.mark.slow
def test_stage_keys_follow_the_stage_each_toggle_changes(tmp_path):
    plan = plan_ablation(micro_spec(tmp_path, [SHRINK, BITS, STRIDE], seeds=(1, 2)))
    keys = {(r.arm.on, r.seed): r.keys for r in plan.runs}
    none, stride, bits, shrink = keys[((), 1)], keys[((STRIDE,), 1)], keys[((BITS,), 1)], keys[((SHRINK,), 1)]
    assert stride.train == none.train and stride.export == none.export and stride.eval != none.eval
    assert bits.train == none.train and bits.export != none.export
    assert shrink.train != none.train
    assert keys[((), 2)].train != none.train  # the seed trains a different model
    assert len({k.eval for k in keys.values()}) == len(keys)


@pytest.mark.slow
def test_stage_keys_see_sections_but_not_logging(tmp_path):
    def keys(*sets):
        return plan_ablation(micro_spec(tmp_path, [STRIDE], sets=sets)).runs[0].keys

    base = keys()
    assert keys("train.log_every=7") == base
    changed_eval = keys("eval.max_tokens=2049")
    assert (changed_eval.train, changed_eval.export) == (base.train, base.export) and changed_eval.eval != base.eval
    changed_export = keys("export.level=6")
    assert changed_export.train == base.train and changed_export.export != base.export
    assert keys("optim.matrix_lr=0.03").train != base.train


def test_a_reserve_changes_the_training_key_only_under_a_wallclock_cap(tmp_path):
    def train_key(seconds, *sets):
        spec = micro_spec(tmp_path, [STRIDE], techniques={RESERVE: {"seconds": seconds}}, sets=sets)
        return plan_ablation(spec).runs[0].keys.train

    assert train_key(1.0) == train_key(2.0)  # step-matched: the reserve cannot shorten training
    capped = ("train.max_wallclock_seconds=60", "train.iterations=3")
    assert train_key(1.0, *capped) != train_key(2.0, *capped)


def test_only_modules_that_make_outputs_enter_the_source_hash():
    import pgolf
    from pgolf.study.cache import NOT_IN_OUTPUTS

    package = Path(pgolf.__file__).parent
    for pattern in NOT_IN_OUTPUTS:  # a renamed module must be listed again
        assert list(package.glob(pattern)), pattern
    from pgolf.study.cache import pgolf_source_hash

    assert {"host.py", "loop.py", "model.py", "quant.py", "scores.py", "products.py"}.isdisjoint(NOT_IN_OUTPUTS)
    assert pgolf_source_hash()


def test_a_technique_acting_before_its_declared_stage_is_refused(tmp_path):
    with pytest.raises(PgolfError, match="declares stage 'eval' but implements pgolf_on_step_end"):
        plan_ablation(micro_spec(tmp_path, [MISDECLARED]))


def test_unknown_toggle_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="unknown technique 'emma'"):
        plan_ablation(micro_spec(tmp_path, ["emma"]))


# --- a real study (one-at-a-time over a train, an export and an eval technique) ---------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    spec = micro_spec(folder, [SHRINK, BITS, STRIDE], seeds=(1, 2), design="one-at-a-time")
    out, summary = run_ablation(spec, folder / "ablation", log=silent)
    return spec, out, summary


@pytest.mark.slow
def test_each_distinct_training_key_trains_once_and_toggles_reuse_earlier_stages(study):
    _, out, summary = study
    # per seed: none, fewer_bits and half_stride share a checkpoint; none and half_stride share an artifact
    assert summary["counts"] == {"train": {"ran": 4, "reused": 4}, "export": {"ran": 6, "reused": 2},
                                 "eval": {"ran": 8, "reused": 0}}
    runs = by_arm_seed(summary)
    assert all(r["status"] == "ok" for r in runs.values())
    assert runs[(STRIDE, 1)]["stages"] == {"train": "reused", "export": "reused", "eval": "ran"}
    assert runs[(BITS, 2)]["stages"] == {"train": "reused", "export": "ran", "eval": "ran"}
    assert runs[(SHRINK, 1)]["stages"] == {"train": "ran", "export": "ran", "eval": "ran"}
    assert len(list((out / "cache" / "train").glob("*/final_model.pt"))) == 4
    assert len(list((out / "runs").glob("*.json"))) == 8


@pytest.mark.slow
def test_reused_stages_give_what_pgolf_run_gives(study, micro_recipe, tmp_path):
    _, _, summary = study
    runs = by_arm_seed(summary)
    direct = run_recipe(micro_recipe("seed=2", techniques={STRIDE: {}}), tmp_path, QUIET)
    cached = runs[(STRIDE, 2)]["result"]  # its checkpoint and artifact were made for the baseline arm
    assert cached["val_bpb"] == direct["val_bpb"] and cached["val_bpb_prequant"] == direct["val_bpb_prequant"]
    assert cached["bytes_code"] == direct["bytes_code"] and cached["valid"]
    assert cached["steps"] == direct["steps"] == 3


def test_the_study_reports_statistics_for_every_variant(study):
    _, _, summary = study
    stats = summary["statistics"]
    assert stats["baseline"] == "none"
    variants = [a for a in stats["arms"] if a.get("comparison")]
    assert [a["id"] for a in variants] == [SHRINK, BITS, STRIDE]
    for arm in variants:
        c = arm["comparison"]
        assert arm["n"] == 2 and c["n_old"] == 2 and c["p_value"] is not None and c["holm_p"] >= c["p_value"]
        assert c["paired"]["n"] == 2  # both arms ran seeds 1 and 2
        assert c["margin_bpb"] > 0 and set(c["verdicts"]) == {"practice", "rule"}
    bits = next(a for a in variants if a["id"] == BITS)
    assert bits["bytes_max"] < next(a for a in stats["arms"] if a["id"] == "none")["bytes_max"]


def test_running_again_recomputes_nothing(study):
    spec, out, _ = study
    entries = [p for p in sorted((out / "cache").glob("*/*")) if p.is_dir()]
    before = {p: p.stat().st_mtime_ns for p in entries}
    _, again = run_ablation(AblationSpec(**spec.to_dict()), out, log=silent)
    assert again["counts"] == {s: {"ran": 0, "reused": 8} for s in ("train", "export", "eval")}
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "cache").glob("*/*")) if p.is_dir()} == before


@pytest.mark.parametrize("fmt", ["table", "md", "csv", "json"])
def test_report_re_renders_every_format_without_running(study, fmt):
    _, out, _ = study
    listing = sorted(str(p) for p in (out / "cache").rglob("*"))
    result = CliRunner().invoke(app, ["report", str(out), "--format", fmt])
    assert result.exit_code == 0, result.output
    assert sorted(str(p) for p in (out / "cache").rglob("*")) == listing
    text = result.stdout
    if fmt == "json":
        data = json.loads(text)
        assert data["counts"]["eval"]["ran"] in (0, 8) and len(data["arms"]) == 4
    elif fmt == "csv":
        lines = text.strip().splitlines()
        assert lines[0].startswith("arm,techniques_on,baseline,n,") and len(lines) == 5
    elif fmt == "md":
        assert text.startswith("| arm | seeds |") and "half_stride" in text and "p<0.25" in text
    else:
        assert "half_stride" in text and "(baseline)" in text and "Holm p" in text


def test_report_draws_a_plot(study, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = study
    png = tmp_path / "study.png"
    result = CliRunner().invoke(app, ["report", str(out), "--format", "csv", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failed_run_is_recorded_marked_and_retried_only_when_asked(tmp_path):
    marker = tmp_path / "fixed"
    spec = micro_spec(tmp_path, [FAILS], techniques={FAILS: {"unless_file": str(marker)}})
    out = tmp_path / "ablation"
    _, summary = run_ablation(spec, out, log=silent)
    runs = by_arm_seed(summary)
    assert runs[("none", 1)]["status"] == "ok"  # the failure did not stop the other run
    failed = runs[(FAILS, 1)]
    assert failed["status"] == "failed" and failed["failed_stage"] == "eval" and "boom" in failed["error"]
    assert json.loads((out / "runs" / failed_record_name(failed)).read_text())["status"] == "failed"
    assert any("failed" in w for w in summary["statistics"]["warnings"])
    md = CliRunner().invoke(app, ["report", str(out), "--format", "md"]).stdout
    assert "FAILED" in md

    _, again = run_ablation(AblationSpec(**spec.to_dict()), out, log=silent)
    assert by_arm_seed(again)[(FAILS, 1)]["status"] == "failed" and again["counts"]["eval"]["ran"] == 0

    marker.write_text("ok")
    _, retried = run_ablation(AblationSpec(**spec.to_dict()), out, retry_failed=True, log=silent)
    assert by_arm_seed(retried)[(FAILS, 1)]["status"] == "ok"
    assert retried["counts"] == {"train": {"ran": 0, "reused": 2}, "export": {"ran": 0, "reused": 2},
                                 "eval": {"ran": 1, "reused": 1}}


def failed_record_name(record: dict) -> str:
    return f"{Arm(tuple(record['toggles_on'])).slug}-seed{record['seed']}.json"


# --- resume after kill -9, with worker processes ------------------------------------------------------


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and relies on PR_SET_PDEATHSIG")
def test_kill_9_then_the_same_command_resumes_without_recomputing(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "ablation"
    command = [sys.executable, "-m", "pgolf", "ablate", str(recipe), "--toggle", STRIDE, "--seeds", "1,2,3",
               "--scale", "tiny", "--workers", "2", "--out", str(out), "--format", "json",
               *[flag for item in MICRO for flag in ("--set", item)]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    evals = out / "cache" / "eval"
    deadline = time.monotonic() + 300
    while not any(p.is_dir() and not p.name.startswith(".") for p in evals.glob("*")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(0.2)
    workers = descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 30
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "worker processes outlived the killed ablation"

    finished = {stage: {p: p.stat().st_mtime_ns for p in (out / "cache" / stage).glob("*")
                        if p.is_dir() and not p.name.startswith(".")} for stage in ("train", "export", "eval")}
    assert 0 < len(finished["eval"]) < 6 and all((p / "result.json").is_file() for p in finished["eval"])
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    summary = json.loads((out / "summary.json").read_text())
    for stage, entries in finished.items():
        assert summary["counts"][stage]["ran"] == {"train": 3, "export": 3, "eval": 6}[stage] - len(entries)
        assert {p: p.stat().st_mtime_ns for p in entries} == entries  # nothing finished was redone
    assert all(r["status"] == "ok" for r in summary["runs"]) and len(summary["runs"]) == 6
    share = max(1, len(os.sched_getaffinity(0)) // 2)  # two workers divide the CPU threads
    assert {json.loads(p.read_text())["threads"] for p in (out / "cache" / "eval").glob("*/manifest.json")} == {share}
    assert not list((out / "cache").glob("*/.tmp-*"))  # the interrupted writes were cleaned up


# --- spec files and the command line ------------------------------------------------------------------


def test_a_spec_file_holds_the_same_fields_and_flags_win(tmp_path):
    recipe = write_recipe(tmp_path / "recipes")
    path = tmp_path / "ablations" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(f"recipe: ../recipes/{recipe.name}\ntoggle: [{STRIDE}]\nseeds: 1,2\nscale: tiny\n"
                    "design: one-at-a-time\nset: ['train.iterations=2']\n")
    assert is_spec_file(path) and not is_spec_file(recipe)
    spec = load_spec(path, {"seeds": [7], "workers": None})
    assert spec.recipe == str(recipe.resolve()) and spec.toggle == [STRIDE] and spec.seeds == [7]
    assert spec.design == "one-at-a-time" and spec.name == "mine" and spec.set == ["train.iterations=2"]
    path.write_text("recipe: x.yaml\ntoggles: [a]\n")
    with pytest.raises(ConfigError, match="Did you mean 'toggle'"):
        load_spec(path, {})
    path.write_text("recipe: x.yaml\ntoggle: [a]\ndesign: factorail\n")
    with pytest.raises(ConfigError, match="Did you mean 'factorial'"):
        load_spec(path, {})


def test_the_shipped_studies_are_valid_specs():
    specs = sorted((REPO / "ablations").glob("*.yaml"))
    assert specs, "ablations/ ships at least one study"
    from pgolf.registry import known_names

    for path in specs:
        spec = load_spec(path, {})
        assert Path(spec.recipe).is_file() and spec.scale == "tiny" and len(spec.seeds) >= 3
        assert set(spec.toggle) <= set(known_names()), f"{path.name} toggles an unregistered technique"
        plan = plan_ablation(spec)
        assert all(run.keys is not None for run in plan.runs)


def test_cli_user_errors_exit_2_without_traceback(tmp_path):
    recipe = write_recipe(tmp_path)
    runner = CliRunner()
    no_toggle = runner.invoke(app, ["ablate", str(recipe)])
    assert no_toggle.exit_code == 2 and "--toggle" in no_toggle.stderr
    bad_seeds = runner.invoke(app, ["ablate", str(recipe), "--toggle", STRIDE, "--seeds", "1,x"])
    assert bad_seeds.exit_code == 2 and "comma-separated integers" in bad_seeds.stderr
    twice = runner.invoke(app, ["ablate", str(recipe), "--toggle", STRIDE, "--seeds", "1,1"])
    assert twice.exit_code == 2 and "every launched seed counts once" in twice.stderr
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no summary.json" in missing.stderr

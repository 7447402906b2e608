"""The command line as a newcomer meets it: one run end to end, and clear errors without tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import MICRO, REPO


def pgolf(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pgolf", *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def micro_flags() -> list[str]:
    """MICRO as --set flags, minus the step settings --steps is tested with."""
    keep = [m for m in MICRO if not m.startswith(("train.iterations", "train.max_wallclock"))]
    return [flag for item in keep for flag in ("--set", item)]


@pytest.mark.slow
def test_run_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "run"
    # best's techniques sized to MICRO's 2 layers and 64-token windows (block 0 looped, lanes from block 1)
    fit = ["techniques.recurrence.loop_start=0", "techniques.recurrence.loop_end=0",
           "techniques.parallel_residuals.start_layer=1", "techniques.ttt.lora_chunk=32",
           "techniques.ttt.chunk_tokens=1024", "techniques.gptq.calibration_batches=2"]
    proc = pgolf("run", "recipes/best.yaml", "--scale", "tiny", "--steps", "2", *micro_flags(),
                 *[flag for item in fit for flag in ("--set", item)], "--out", str(out), "--strict")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["valid"]
    assert "val_bpb" in proc.stdout and (out / "log.txt").read_text().count("== ") >= 3


def test_plugins_lists_json():
    from pgolf.hookspecs import HOOK_STAGES
    from pgolf.registry import describe, known_names, load_technique_class
    from pgolf_plugins import BUILTINS

    proc = pgolf("plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(rows) and set(by_key) == set(known_names()) >= set(BUILTINS)
    for key in BUILTINS:
        row, cls = by_key[key], load_technique_class(key)
        assert row["name"] == key and row["module"] == cls.__module__ and row["summary"] == cls.summary
        assert row["stage"] == cls.stage and cls.stage in ("train", "export", "eval"), key
        assert row["hooks"] == cls.hook_names() and row["hooks"], key
        assert set(row["hooks"]) <= set(HOOK_STAGES), key  # every listed hook is a real hook
        assert row == json.loads(json.dumps(describe(cls) | {"key": key}))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "recipes/nope.yaml"], "recipe file not found"),
        (["run", "recipes/baseline.yaml", "--set", "model.num_layrs=2"], "Did you mean 'num_layers'?"),
        (["run", "recipes/baseline.yaml", "--set", "techniques.emma={}"], "unknown technique 'emma'"),
        (["run", "recipes/baseline.yaml", "--scale", "tiny", "--data", "/nonexistent"], "data directory not found"),
        (["eval", "/nonexistent/run"], "not found"),
    ],
)
def test_user_errors_are_one_paragraph_with_exit_code_2(args, message):
    proc = pgolf(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [\n")
    proc = pgolf("run", str(bad))
    assert proc.returncode == 2 and "line" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = pgolf("run", "recipes/nope.yaml", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_python_dash_m_is_the_same_program():
    proc = pgolf("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "ablate" not in proc.stderr

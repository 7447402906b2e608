"""A third-party technique is found through its package's entry point, and runs only when named.

The example package (examples/pgolf-example-technique) is installed by pip into a temporary
``--target`` directory. Every check that needs it runs in a subprocess whose PYTHONPATH adds that
directory, so the test environment itself never sees the package (and the conformance suite
here does not pick it up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgolf.registry import known_names
from tests.conftest import MICRO, REPO

EXAMPLE = REPO / "examples" / "pgolf-example-technique"
NAME = "magnitude_prune"
# Full learning rate for the micro run's 3 steps, so block matrices survive int8 export and
# pruning them changes the artifact.
RUN_FLAGS = [flag for item in [*MICRO, "train.warmdown_iters=0"] for flag in ("--set", item)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed with pip (no index, no build isolation) into a throwaway directory."""
    pytest.importorskip("setuptools", reason="building the example package needs setuptools (the dev extra)")
    work = tmp_path_factory.mktemp("third-party")
    source = work / "pgolf-example-technique"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "pgolf_example_technique").is_dir()
    return target


def with_site(site: Path, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def runs(site, tmp_path_factory) -> dict[str, Path]:
    """The same micro run twice with the package installed: once not naming it, once naming it."""
    work = tmp_path_factory.mktemp("runs")
    recipe = work / "pruned.yaml"
    recipe.write_text(f"base: baseline.yaml\nname: pruned\ntechniques:\n  {NAME}:\n    fraction: 0.5\n")
    out = {"unnamed": work / "unnamed", "named": work / "named"}
    for key, path in (("unnamed", REPO / "recipes" / "baseline.yaml"), ("named", recipe)):
        proc = with_site(site, "-m", "pgolf", "run", str(path), "--scale", "tiny", *RUN_FLAGS, "--out", str(out[key]))
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_the_test_environment_itself_does_not_have_it():
    assert NAME not in known_names()


def test_pgolf_plugins_lists_it(site):
    proc = with_site(site, "-m", "pgolf", "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {row["key"]: row for row in json.loads(proc.stdout)}
    assert rows[NAME]["module"] == "pgolf_example_technique"
    assert rows[NAME]["stage"] == "export" and rows[NAME]["config"] == {"fraction": 0.05}
    assert rows[NAME]["hooks"] == ["pgolf_contribute_metrics", "pgolf_on_export_start"]


def test_installed_but_not_named_is_inactive(runs):
    manifest = json.loads((runs["unnamed"] / "manifest.json").read_text())
    assert manifest["techniques"] == [] and NAME not in manifest["trace"]
    assert not any(k.startswith("magnitude_prune") for k in json.loads((runs["unnamed"] / "result.json").read_text())["metrics"])


def test_named_in_a_recipe_it_runs_and_the_manifest_records_it(runs):
    manifest = json.loads((runs["named"] / "manifest.json").read_text())
    (entry,) = manifest["techniques"]
    assert entry["name"] == NAME and entry["module"] == "pgolf_example_technique"
    assert entry["version"] == "0.1.0" and entry["config"] == {"fraction": 0.5} and entry["stage"] == "export"
    assert manifest["trace"][NAME]["pgolf_on_export_start"]["calls"] == 1
    named = json.loads((runs["named"] / "result.json").read_text())
    unnamed = json.loads((runs["unnamed"] / "result.json").read_text())
    assert named["metrics"]["magnitude_prune_zeroed_fraction"] >= 0.5
    assert named["bytes_model"] < unnamed["bytes_model"]  # it did what it says
    assert named["val_bpb_prequant"] == unnamed["val_bpb_prequant"]  # and only from export on
    assert named["valid"], named["failed_audits"]


@pytest.mark.slow
def test_the_example_package_passes_its_own_tests(site):
    copy = site.parent / "pgolf-example-technique"  # the installed source, so nothing is written into the repo
    proc = with_site(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests"), cwd=copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr

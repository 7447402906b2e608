"""The submission pgolf exports: one self-contained train_gpt.py whose size is the counted code bytes,
and a records folder that pgolf's own records reader takes back.

The end-to-end test runs the exported file where pgolf is not installed: an interpreter without
site-packages (`-S`, or the base interpreter under torchrun) whose PYTHONPATH is a folder of links to
the distributions requirements.txt names and what they require, nothing else.
"""

from __future__ import annotations

import ast
import base64
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from pgolf import bundle
from pgolf.bundle import build_bundle, code_bytes, import_closure, requirements_for, submission_program
from pgolf.bundle_main import challenge_data_path, recipe_with_environment
from pgolf.recipe import RECIPES_DIR, load_recipe
from tests.conftest import pinned_thread_env, pinned_threads

BASE = sys._base_executable  # the interpreter without this virtual environment's site-packages


def tiny_recipe(name: str = "baseline.yaml") -> dict:
    return load_recipe(RECIPES_DIR / name, scale="tiny").to_dict()


def embedded_program(text: str) -> str:
    """The program a bundle's loader executes, decoded without executing it."""
    packed = re.search(r'b85decode\("([^"]+)"\)', text).group(1)
    return lzma.decompress(base64.b85decode(packed)).decode("utf-8")


# --- the bundle ------------------------------------------------------------------------------------


def test_the_closure_holds_the_run_and_leaves_the_tooling_out():
    modules, external = import_closure([bundle.ENTRY_MODULE, "pgolf_plugins.ema"], bundle.HOST_ROOTS)
    assert {"pgolf.host", "pgolf.model", "pgolf.loop", "pgolf.bundle", "pgolf_plugins", "pgolf_plugins.ema",
            "pgolf.data"} <= set(modules)
    assert not [m for m in modules if m.startswith(("pgolf.cli", "pgolf.study", "pgolf.doctor", "pgolf.testing"))]
    assert "pgolf_plugins.ttt" not in modules  # only the enabled techniques
    assert {"torch", "numpy", "yaml", "pluggy", "sentencepiece", "brotli"} <= external
    names = {r.split("==")[0].lower() for r in requirements_for(external)}
    assert {"torch", "numpy", "pyyaml", "pluggy", "sentencepiece", "brotli"} <= names
    assert "python-minifier" not in names  # imported only to build a bundle


def test_the_bundle_is_a_two_line_loader_of_minified_sources():
    recipe = tiny_recipe("best.yaml")
    built = build_bundle(submission_program(recipe, {recipe["seed"]: 40}))
    lines = built.text.splitlines()
    assert len(lines) == 2 and lines[0] == "import lzma as L,base64 as B" and lines[1].startswith("exec(L.decompress(")
    program = embedded_program(built.text)
    assert "pickle" not in program and "open(" not in program.split("\nR=")[-1]  # the bootstrap writes nothing
    assert "pgolf_plugins.ttt" in built.modules and "pgolf.cli" not in built.modules
    assert built.minified and built.note is None
    assert built.size < built.raw_bytes / 4  # minified and compressed: the records' way of shipping code
    embedded = json.loads(ast.literal_eval(re.search(r"\nR=('.*')\n", program).group(1)))
    assert embedded["recipe"]["train"]["iterations"] == 40 and embedded["recipe"]["train"]["max_wallclock_seconds"] == 0
    assert embedded["recipe"]["data"]["dir"] is None  # left to DATA_PATH


def test_code_bytes_are_the_size_of_the_exported_file():
    recipe = tiny_recipe()
    counted = code_bytes(recipe, steps=12)
    assert counted.compressed == build_bundle(submission_program(recipe, {recipe["seed"]: 12})).size
    assert counted.raw > 10 * counted.compressed / 4 and "pgolf.model" in counted.files
    with_ema = code_bytes({**recipe, "techniques": {"ema": {}}}, steps=12)
    assert with_ema.compressed > counted.compressed and "pgolf_plugins.ema" in with_ema.files


def test_without_python_minifier_the_sources_go_in_unminified_and_the_bundle_says_so(monkeypatch):
    recipe = tiny_recipe()
    minified = code_bytes(recipe, steps=5)
    monkeypatch.setitem(sys.modules, "python_minifier", None)  # an absent package: its import raises
    bundle.minify_source.cache_clear()
    bundle._build_cached.cache_clear()
    try:
        plain = code_bytes(recipe, steps=5)
    finally:
        bundle.minify_source.cache_clear()
        bundle._build_cached.cache_clear()
    assert not plain.minified and "python-minifier is not installed" in plain.note
    assert plain.compressed > minified.compressed


def test_step_matching_and_the_challenge_environment():
    recipe = tiny_recipe()
    program = submission_program(recipe, {42: 30, 314: 31})
    kept = submission_program(recipe, {42: 30}, keep_wallclock=True)
    assert kept["recipe"]["train"] == recipe["train"] and kept["iterations_by_seed"] == {}
    env = {"DATA_PATH": "/data/sp", "SEED": "314"}
    run = recipe_with_environment(program["recipe"], program["iterations_by_seed"], env)
    assert run["seed"] == 314 and run["train"]["iterations"] == 31 and run["data"]["dir"] == "/data/sp"
    assert run["data"]["tokenizer"] is None and run["train"]["max_wallclock_seconds"] == 0
    env = {"ITERATIONS": "7", "MAX_WALLCLOCK_SECONDS": "600", "TOKENIZER_PATH": "/t.model"}
    run = recipe_with_environment(program["recipe"], program["iterations_by_seed"], env)
    assert run["train"]["iterations"] == 7 and run["train"]["max_wallclock_seconds"] == 600.0
    assert run["data"]["dir"] == challenge_data_path(1024) == "./data/datasets/fineweb10B_sp1024"
    assert run["data"]["tokenizer"] == "/t.model"


# --- end to end: run, export, run the export without pgolf --------------------------------------------


def dependency_site(requirements: list[str], folder: Path) -> Path:
    """A folder of links to the named distributions and everything they require (not pgolf)."""
    pending = [re.match(r"[A-Za-z0-9._-]+", line).group(0) for line in requirements if line and line[0].isalnum()]
    seen: set[str] = set()
    folder.mkdir()
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # a requirement behind a marker that does not apply here
        pending += [re.match(r"[A-Za-z0-9._-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            target = Path(dist.locate_file(top))
            if top != ".." and not top.endswith(".pth") and target.exists() and not (folder / top).exists():
                (folder / top).symlink_to(target)
    assert "pgolf" not in seen and not list(folder.glob("*editable*")) and not (folder / "pgolf").exists()
    return folder


@pytest.mark.slow
def test_an_exported_run_reproduces_without_pgolf_and_reads_back_as_a_record(tmp_path):
    from pgolf.data.dataset import embedded_dataset_dir
    from pgolf.study.records import import_records
    from pgolf.study.submissions import read_submission
    from pgolf.submission_export import export_submission
    from pgolf.testing import micro_recipe, tiny_run

    with pinned_threads():
        result = tiny_run(micro_recipe(), tmp_path / "run")
    out = tmp_path / "records" / "2026-05-01_micro"
    exported = export_submission(tmp_path / "run", out, base_pr=1493, author="a", github_id="b", log=lambda _: None)
    code = out / "train_gpt.py"
    assert result["bytes_code"] == os.path.getsize(code) == exported.bundle.size
    assert result["bytes_total"] == result["bytes_model"] + os.path.getsize(code)

    sub = json.loads((out / "submission.json").read_text())
    seed = str(result["seed"])
    assert sub["seeds"] == [result["seed"]] and sub["launched_seeds"] == [result["seed"]]
    assert sub["seed_results"][seed]["val_bpb"] == round(result["val_bpb"], 8)
    assert sub["seed_results"][seed]["artifact_bytes"] == result["bytes_total"] == sub["bytes_total"]
    assert sub["bytes_code"] == os.path.getsize(code) and sub["val_tokens"] == result["val_tokens"]
    assert sub["base_pr"] == 1493 and sub["all_launched_seeds_reported"] and sub["code_date"] and sub["date"]
    assert sub["compliance"]["valid"] and sub["compliance"]["pgolf_audits"]["causality"] == {seed: True}
    assert sub["logs"] == {f"seed{seed}": f"train_seed{seed}.log"} and (out / f"train_seed{seed}.log").is_file()
    assert "## Audits" in (out / "README.md").read_text()
    assert read_submission(str(out), "--new").scores == [sub["val_bpb"]]
    _, stored = import_records(out, name="micro", store=tmp_path / "store")
    assert not stored["warnings"] and stored["runs"][0]["matches"] == ["submission.json"]

    site = dependency_site((out / "requirements.txt").read_text().splitlines(), tmp_path / "site")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(site), "HOME": str(tmp_path / "home"), **pinned_thread_env(),
           "DATA_PATH": str(embedded_dataset_dir(1024, None)), "RUN_DIR": str(tmp_path / "rerun")}
    bare = subprocess.run([BASE, "-S", "-c", "import pgolf"], env=env, cwd=workdir, capture_output=True, text=True)
    assert bare.returncode != 0 and "No module named 'pgolf'" in bare.stderr
    proc = subprocess.run([BASE, "-S", str(code)], env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = json.loads((tmp_path / "rerun" / "result.json").read_text())
    assert rerun["val_bpb"] == result["val_bpb"] and rerun["steps"] == result["steps"]
    assert rerun["bytes_code"] == os.path.getsize(code) and rerun["valid"]
    assert list(workdir.iterdir()) == [] and not (tmp_path / "home").exists()  # nothing written outside RUN_DIR

    # torchrun starts its ranks without -S: the base interpreter, which has no pgolf either.
    probe = subprocess.run([BASE, "-c", "import pgolf"], env=env, cwd=workdir, capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("the base interpreter has pgolf installed: torchrun's ranks would not run bare")
    env["RUN_DIR"] = str(tmp_path / "torchrun")
    proc = subprocess.run([BASE, "-S", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(code)], env=env, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "torchrun" / "result.json").read_text())["val_bpb"] == result["val_bpb"]
    shutil.rmtree(site)

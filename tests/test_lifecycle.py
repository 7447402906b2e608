"""The whole lifecycle at micro scale: outputs, determinism, audits on real runs, eval-only paths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pgolf.errors import RegistryError, TrainingError
from pgolf.evalonly import evaluate_target, infer_model_fields
from pgolf.lifecycle import run_recipe
from pgolf.registry import Technique
from pgolf.reporter import Reporter
from tests.conftest import MICRO

M = "tests.test_lifecycle"
QUIET = Reporter(quiet=True)

RESULT_KEYS = {"val_loss", "val_bpb", "val_bpb_prequant", "val_tokens", "val_bytes", "bytes_code", "bytes_model",
               "bytes_total", "train_seconds", "eval_seconds", "steps", "seed", "compliance", "valid"}


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    from pgolf.recipe import load_recipe
    from tests.conftest import MICRO, REPO

    out = tmp_path_factory.mktemp("run")
    recipe = load_recipe(REPO / "recipes" / "baseline.yaml", MICRO, scale="tiny")
    return out, run_recipe(recipe, out, QUIET)


def test_a_run_leaves_everything_the_issue_lists(baseline_run):
    out, result = baseline_run
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "log.txt", "result.json", "artifact.pga",
                 "final_model.pt"):
        assert (out / name).is_file(), name
    assert RESULT_KEYS <= set(json.loads((out / "result.json").read_text()))
    assert result["steps"] == 3 and result["valid"], result["failed_audits"]
    assert result["bytes_total"] == result["bytes_model"] + result["bytes_code"]
    assert result["bytes_model"] == (out / "artifact.pga").stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trace"]["host"]["pgolf_provide_model"]["calls"] >= 2  # train + round trip
    assert manifest["torch"] == torch.__version__
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert set(result["compliance"]) == {"normalization", "causality", "score_before_update", "no_val_leakage",
                                         "time_budget", "byte_budget", "byte_accounting"}


def test_same_seed_same_bits(baseline_run, micro_recipe, tmp_path):
    _, first = baseline_run
    again = run_recipe(micro_recipe(), tmp_path, QUIET)
    assert again["val_bpb"] == first["val_bpb"] and again["val_bpb_prequant"] == first["val_bpb_prequant"]
    other = run_recipe(micro_recipe("seed=2"), tmp_path / "s2", QUIET)
    assert other["val_bpb"] != first["val_bpb"]


def test_eval_only_rescoring_matches_the_run(baseline_run):
    out, result = baseline_run
    again = evaluate_target(out, log=lambda m: None)
    assert again["val_bpb"] == result["val_bpb"]
    assert again["bytes_total"] == result["bytes_total"]


def test_a_challenge_style_checkpoint_is_exported_and_scored(baseline_run, tmp_path):
    out, result = baseline_run
    state = torch.load(out / "final_model.pt", weights_only=True)
    fields = infer_model_fields(state)
    assert (fields["num_layers"], fields["model_dim"], fields["num_heads"], fields["num_kv_heads"]) == (2, 64, 2, 1)
    scored = evaluate_target(out / "final_model.pt", recipe=None, scale="tiny", overrides=MICRO, out_dir=tmp_path,
                             log=lambda m: None)
    assert scored["val_bpb_prequant"] == pytest.approx(result["val_bpb_prequant"], rel=1e-9)
    assert scored["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)
    assert (tmp_path / "result.json").is_file()


class FutureLeak(Technique):
    """Invalid on purpose: improves each score using the *next* token."""

    name = "future_leak"
    stage = "eval"

    def pgolf_on_scores(self, scores, ctx):
        nxt = np.append(scores.tokens[1:], 0)
        scores.nll -= 1e-4 * nxt * scores.scored


class NeverFires(Technique):
    name = "never_fires"
    stage = "eval"

    def pgolf_on_artifact_loaded(self, model, ctx):
        if False:  # pragma: no cover - the point is that nothing happens
            pass


def test_audits_catch_a_scorer_that_reads_the_future(micro_recipe, tmp_path):
    result = run_recipe(micro_recipe(techniques={f"{M}:FutureLeak": {}}), tmp_path, QUIET)
    assert not result["valid"]
    assert not result["compliance"]["causality"]["passed"]
    assert not result["compliance"]["normalization"]["passed"]


def test_a_technique_that_never_fires_fails_the_run(micro_recipe, tmp_path):
    class Silent(Technique):
        name = "silent"

    import tests.test_lifecycle as me

    me.Silent = Silent
    with pytest.raises(RegistryError, match="silent never fired"):
        run_recipe(micro_recipe(techniques={f"{M}:Silent": {}}), tmp_path, QUIET)
    assert "never fired" in json.loads((tmp_path / "result.json").read_text())["error"]


def test_nan_loss_is_a_clear_error(micro_recipe, tmp_path):
    with pytest.raises(TrainingError, match="training loss became nan"):
        run_recipe(micro_recipe("optim.tied_embed_lr=1e30", "optim.matrix_lr=1e30"), tmp_path, QUIET)


def test_strict_time_budget_stops_before_the_cap(micro_recipe, tmp_path):
    result = run_recipe(micro_recipe("train.iterations=10000", "train.max_wallclock_seconds=3"), tmp_path, QUIET)
    assert result["train_seconds"] <= 3.0 and result["compliance"]["time_budget"]["passed"]

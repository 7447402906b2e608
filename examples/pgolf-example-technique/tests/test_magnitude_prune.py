"""Tests of the example technique: the functional core alone, then the plugin inside real pgolf runs.

Run them after installing the package next to pgolf: ``pip install ./examples/pgolf-example-technique``
then ``pytest examples/pgolf-example-technique/tests``.
"""

from __future__ import annotations

import json

import pytest
import torch
from pgolf.errors import ConfigError
from pgolf.lifecycle import run_recipe
from pgolf.recipe import recipe_from_dict
from pgolf.registry import known_names, load_technique_class, resolve
from pgolf.reporter import Reporter

from pgolf_example_technique import MagnitudePrune, prune_rows

# A whole pgolf run in a few seconds on a CPU: the embedded corpus, 2 layers x 64, 3 steps at full
# learning rate (so the block matrices move far enough to survive int8 export).
MICRO = {
    "model": {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1},
    "train": {"seq_len": 64, "batch_tokens": 1024, "grad_accum_steps": 1, "warmup_steps": 1, "iterations": 3,
              "max_wallclock_seconds": 0, "warmdown_iters": 0},
    "eval": {"batch_tokens": 4096, "max_tokens": 4097, "audit_positions": 4},
    "export": {"keep_float_max_numel": 1024},
}


def test_prune_rows_zeroes_the_smallest_entries_of_every_row():
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    pruned = prune_rows(w, 0.25)
    assert ((pruned == 0).sum(dim=1) == 10).all()
    kept = pruned != 0
    for row in range(8):  # every kept weight is at least as large as every pruned one
        assert w[row][kept[row]].abs().min() >= w[row][~kept[row]].abs().max()
    torch.testing.assert_close(pruned[kept], w[kept])
    torch.testing.assert_close(prune_rows(w, 0.0), w)
    with pytest.raises(ValueError, match="expects a matrix"):
        prune_rows(torch.ones(3), 0.5)


def test_the_entry_point_makes_it_a_named_technique():
    assert "magnitude_prune" in known_names()
    assert load_technique_class("magnitude_prune") is MagnitudePrune
    (enabled,) = resolve({"magnitude_prune": {"fraction": 0.2}})
    assert enabled.instance.config.fraction == 0.2 and enabled.stage == "export"


def test_a_fraction_outside_the_range_is_a_config_error():
    with pytest.raises(ConfigError, match="fraction must lie in"):
        resolve({"magnitude_prune": {"fraction": 1.5}})


def test_pruning_shrinks_the_artifact_and_is_reported(tmp_path):
    quiet = Reporter(quiet=True)
    plain = run_recipe(recipe_from_dict({**MICRO, "name": "plain"}), tmp_path / "plain", quiet)
    pruned = run_recipe(recipe_from_dict({**MICRO, "name": "pruned", "techniques": {"magnitude_prune": {"fraction": 0.5}}}),
                        tmp_path / "pruned", quiet)
    assert pruned["bytes_model"] < plain["bytes_model"]
    assert pruned["val_bpb_prequant"] == plain["val_bpb_prequant"]  # training is untouched: export stage only
    assert pruned["val_bpb"] != plain["val_bpb"]
    assert pruned["metrics"]["magnitude_prune_zeroed_fraction"] >= 0.5
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["trace"]["magnitude_prune"]["pgolf_on_export_start"]["calls"] == 1
    assert pruned["valid"], pruned["failed_audits"]

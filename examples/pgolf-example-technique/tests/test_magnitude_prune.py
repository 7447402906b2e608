"""Tests of the example technique: the functional core alone, then the plugin inside real pgolf runs.

Run them after installing the package next to pgolf: ``pip install ./examples/pgolf-example-technique``
then ``pytest examples/pgolf-example-technique/tests``. They use only `pgolf.api` and `pgolf.testing`,
the two pgolf modules a technique package may rely on.
"""

from __future__ import annotations

import pytest
import torch
from pgolf.api import ConfigError
from pgolf.testing import assert_fired, installed_techniques, load_technique, micro_recipe, tiny_run

from pgolf_example_technique import MagnitudePrune, prune_rows

# Full learning rate for the micro run's 3 steps, so the block matrices move far enough to survive
# int8 export and pruning them changes the artifact.
FULL_LR = "train.warmdown_iters=0"


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
    assert "magnitude_prune" in installed_techniques()
    technique = load_technique("magnitude_prune", {"fraction": 0.2})
    assert type(technique) is MagnitudePrune
    assert technique.config.fraction == 0.2 and technique.stage_for() == "export"


def test_a_fraction_outside_the_range_is_a_config_error():
    with pytest.raises(ConfigError, match="fraction must lie in"):
        load_technique("magnitude_prune", {"fraction": 1.5})


def test_pruning_shrinks_the_artifact_and_is_reported(tmp_path):
    plain = tiny_run(micro_recipe(FULL_LR, "name=plain"))
    pruned = tiny_run(micro_recipe(FULL_LR, "name=pruned", techniques={"magnitude_prune": {"fraction": 0.5}}),
                      tmp_path / "pruned")
    assert pruned["bytes_model"] < plain["bytes_model"]
    assert pruned["val_bpb_prequant"] == plain["val_bpb_prequant"]  # training is untouched: export stage only
    assert pruned["val_bpb"] != plain["val_bpb"]
    assert pruned["metrics"]["magnitude_prune_zeroed_fraction"] >= 0.5
    calls = assert_fired(tmp_path / "pruned", "magnitude_prune", hooks=["pgolf_on_export_start"])
    assert calls["pgolf_on_export_start"] == 1
    assert pruned["valid"], pruned["failed_audits"]

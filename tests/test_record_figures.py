"""pgolf's record recipes compute what the records' own code computes.

tests/data/record_figures/<record>.npz holds, for each record, a seeded state dict in the record's own
parameter names (banks included), fixed tokens with documents in them, and the logits and losses the
record's `train_gpt.py` computed on them at a micro size (written by tools/record_figures.py from a
checkout of the challenge repository; no record code is in this repository). Here pgolf builds the
record's recipe at the same size, loads the state dict through the record checkpoint adapter (strictly)
and must reproduce every figure. The full-size parameter counts are the `model_params` each record's log
printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf.host import Session, model_from_checkpoint
from pgolf.products import Checkpoint
from pgolf.recipe import RECIPES_DIR, load_recipe
from pgolf.record_checkpoint import from_record_state
from tests.conftest import pinned_threads

FIGURES = Path(__file__).parent / "data" / "record_figures"
RECORDS = sorted(p.stem for p in FIGURES.glob("*.npz"))
# model_params printed by each record's train_seed42 log (the #1868 rerun log for #1868)
MODEL_PARAMS = {"pr1493": 35_944_536, "pr1855": 35_945_671, "pr1868": 35_945_671, "pr2135": 35_945_673}


def micro_overrides(env: dict[str, float]) -> list[str]:
    """The record's micro environment as pgolf recipe overrides (the same model, shrunk alike)."""
    return [
        f"model.vocab_size={env['VOCAB_SIZE']}", f"model.num_layers={env['NUM_LAYERS']}",
        f"model.model_dim={env['MODEL_DIM']}", f"model.num_heads={env['NUM_HEADS']}",
        f"model.num_kv_heads={env['NUM_KV_HEADS']}", f"model.mlp_mult={env['MLP_MULT']}",
        f"train.seq_len={env['TRAIN_SEQ_LEN']}", f"techniques.partial_rope.dims={env['ROPE_DIMS']}",
        f"techniques.xsa.last_n={env['XSA_LAST_N']}", f"techniques.recurrence.loop_start={env['LOOP_START']}",
        f"techniques.recurrence.loop_end={env['LOOP_END']}", f"techniques.recurrence.num_loops={env['NUM_LOOPS']}",
        f"techniques.parallel_residuals.start_layer={env['PARALLEL_START_LAYER']}",
    ]


def record_session(name: str, overrides: list[str]) -> Session:
    recipe = load_recipe(RECIPES_DIR / "records" / f"{name}.yaml", overrides=overrides)
    recipe.techniques.pop("casefold", None)  # a text transform: nothing of the model
    return Session(recipe)


@pytest.fixture(scope="module")
def figures() -> dict[str, dict[str, np.ndarray]]:
    return {name: dict(np.load(FIGURES / f"{name}.npz")) for name in RECORDS}


def test_every_record_has_figures() -> None:
    assert RECORDS == sorted(MODEL_PARAMS)


@pytest.mark.parametrize("name", RECORDS)
def test_record_model_matches_the_records_code(name: str, figures) -> None:
    data = figures[name]
    meta = json.loads(str(data["meta"]))
    state = {k.split("/", 1)[1]: torch.from_numpy(v.astype(np.float32)) for k, v in data.items()
             if k.startswith("state/")}
    # as `pgolf eval final_model.pt` loads a record's model: strictly, then trained state re-activated (looping)
    model = model_from_checkpoint(record_session(name, micro_overrides(meta["micro_env"])),
                                  Checkpoint(from_record_state(state), {})).eval()
    inputs, targets = torch.from_numpy(data["inputs"]), torch.from_numpy(data["targets"])
    cut = 0
    if "doc_logits" in data:
        # trained with document-isolated attention: the records' loader packs a batch as one row and cuts a
        # document every train_seq_len tokens (here 41..113 is cut at 105), as pgolf's loop does
        inputs, targets = inputs.reshape(1, -1), targets.reshape(1, -1)
        expected_logits, expected_loss = data["doc_logits"], data["doc_loss"]
        cut = int(meta["micro_env"]["TRAIN_SEQ_LEN"])
    else:
        expected_logits, expected_loss = data["logits"], data["loss"]
    with torch.no_grad(), pinned_threads():  # the figures were computed on one thread
        logits = model.logits(model.forward_hidden(inputs, max_doc_len=cut))
        torch.testing.assert_close(logits, torch.from_numpy(expected_logits), rtol=0, atol=1e-5)
        assert float(model(inputs, targets, max_doc_len=cut)) == pytest.approx(float(expected_loss), abs=1e-5)


@pytest.mark.parametrize("name", RECORDS)
def test_full_size_parameter_count_is_the_logs(name: str) -> None:
    session = record_session(name, [])
    with torch.device("meta"):
        model = session.hook.pgolf_provide_model(ctx=session.ctx)
        session.hook.pgolf_on_model_built(model=model, ctx=session.ctx)
    assert sum(p.numel() for p in model.parameters()) == MODEL_PARAMS[name]

"""Every eval-stage path charges BPB on the byte sidecar when the data has one (techniques.md §4 f.5).

A transformed dataset (CaseOps, casefold) counts the original bytes of each token in
`fineweb_val_bytes_*.bin`; the piece-length LUT would count the transformed text instead. The
sliding, TTT and PPM paths must all divide by the sidecar's bytes.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pgolf.data.dataset import ensure_embedded_dataset
from pgolf.data.shards import VAL_GLOB, list_shards, read_shard, write_split
from pgolf.host import run
from pgolf.reporter import Reporter


@pytest.fixture(scope="module")
def sidecar_dir(tmp_path_factory):
    """The embedded dataset plus a sidecar that differs from the LUT count at most positions."""
    source = ensure_embedded_dataset(1024)
    out = tmp_path_factory.mktemp("sidecar-data")
    for path in source.iterdir():
        shutil.copy(path, out / path.name)
    tokens = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in list_shards(out, VAL_GLOB)])
    sidecar = (tokens % 5).astype(np.int64)  # any per-token count the LUT would not produce
    sidecar[tokens == 1] = 0
    write_split(out, "val_bytes", sidecar)
    return out, sidecar


@pytest.mark.parametrize("techniques", [
    {"sliding_window": {"seq_len": 128}, "ttt": {"chunk_tokens": 1024}, "ppm": {}},
    {"ttt": {"mode": "lora", "lora_rank": 4}},
], ids=["sliding+sgd+ppm", "lora"])
def test_eval_paths_divide_by_the_sidecar_bytes(sidecar_dir, techniques, micro_recipe, tmp_path):
    directory, sidecar = sidecar_dir
    recipe = micro_recipe(f"data.dir={directory}", techniques=techniques)
    result = run(recipe, tmp_path, Reporter(quiet=True))
    assert result["val_tokens"] == 4096  # every target of the 4,097-token stream, once
    assert result["val_bytes"] == int(sidecar[1:4097].sum())
    assert result["compliance"]["byte_accounting"]["detail"]["byte_source"] == "sidecar"
    assert result["valid"], result["failed_audits"]

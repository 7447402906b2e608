"""Data-parallel training on CPU: 2 gloo processes reproduce 1 process with the same global batch.

World 2 x grad_accum 1 against world 1 x grad_accum 2, a micro run through `torchrun`. The two
are bit-identical, so the test asserts exact equality, not a tolerance. Why no bit can differ:
- data: `DistributedTokenLoader` gives rank r the r-th span of one contiguous chunk, which is
  exactly the r-th accumulation micro-batch of the single process, at the same shape;
- gradients: the single process backpropagates ``loss * 1/2`` per micro-batch and autograd adds
  the two; DDP backpropagates ``loss * 1`` and multiplies each bucket by 1/world before its
  all-reduce. Scaling by a power of two is exact in floating point (every backward op is linear
  in its incoming gradient), and a sum of two addends is the same in either order;
- Muon: each rank orthogonalises its round-robin share and the all-reduce adds exact zeros for
  the rest; Adam runs identically on every rank;
- evaluation: windows are split across ranks and `TokenScores.reduce` sums per-position arrays
  in which every position has exactly one non-zero contribution, and the BPB is summed over the
  whole array afterwards in one fixed order. Scoring a window gives the same bits whatever else
  is in its batch on this CPU build (each row of a matmul is reduced over the same inner
  dimension in the same order), which is the one property here that is a fact about kernels
  rather than arithmetic: a build where it fails would surface as a last-bit difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pgolf.host import run
from pgolf.reporter import Reporter
from tests.conftest import MICRO, REPO, pinned_thread_env, pinned_threads

# Full learning rate, so three steps move the weights well past the int8 grid.
DDP_MICRO = [*MICRO, "train.warmdown_iters=0"]
RUN_FILES = {"config.yaml", "manifest.json", "metrics.jsonl", "log.txt", "result.json", "artifact.pga", "final_model.pt",
             "train.json", "export.json"}


def torchrun_micro(out, *overrides: str) -> subprocess.CompletedProcess:
    """A 2-rank micro run; each rank on the thread count `pinned_threads` gives this process (torchrun
    only defaults OMP_NUM_THREADS to 1 when the caller's environment leaves it unset)."""
    flags = [f for item in [*DDP_MICRO, *overrides] for f in ("--set", item)]
    env = {**os.environ, "PYTHONPATH": str(REPO), **pinned_thread_env()}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "pgolf", "run", "recipes/baseline.yaml", "--scale", "tiny", *flags, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_bit_for_bit(micro_recipe, tmp_path):
    with pinned_threads():
        single = run(micro_recipe("train.warmdown_iters=0", "train.grad_accum_steps=2"), tmp_path / "world1",
                     Reporter(quiet=True))
    out = tmp_path / "world2"
    proc = torchrun_micro(out, "train.grad_accum_steps=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    double = json.loads((out / "result.json").read_text())

    # (Not bytes_model: the artifact's metadata carries the recipe, whose grad_accum_steps differ, and timings.)
    for key in ("val_bpb", "val_loss", "val_bpb_prequant", "val_loss_prequant", "val_tokens", "val_bytes"):
        assert double[key] == single[key], key
    assert double["train"]["final_train_loss"] == single["train"]["final_train_loss"]  # the mean over ranks
    weights1 = torch.load(tmp_path / "world1" / "final_model.pt")
    weights2 = torch.load(out / "final_model.pt")
    assert all(torch.equal(weights1[k], weights2[k]) for k in weights1)

    # Evaluation split across ranks, then reduced: every position once, probes from the audits kept.
    assert double["valid"] and double["failed_audits"] == []
    norm = double["compliance"]["normalization"]["detail"]
    assert norm["scored_twice"] == 0 and norm["missing"] == 0
    assert norm["scored"] == single["compliance"]["normalization"]["detail"]["scored"]
    assert norm["positions"] == single["compliance"]["normalization"]["detail"]["positions"] == 4
    assert double["compliance"]["causality"]["passed"]

    # Only rank 0 writes the run directory: each line once, nothing else left behind.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert (out / "log.txt").read_text().count("== train") == 1
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert proc.stdout.count("results in") == 1

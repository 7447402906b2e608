"""What a submission's train_gpt.py runs: the embedded recipe through the host, configured as the challenge's script is.

The challenge's train_gpt.py is configured by environment variables; these are the ones that
mean the same here. `DATA_PATH` is the shard directory (default: the challenge's
`./data/datasets/fineweb10B_sp<vocab>`), `TOKENIZER_PATH` the SentencePiece model (default: found
beside the shards or in the challenge's `../tokenizers/`), `SEED` the seed, `ITERATIONS` and
`MAX_WALLCLOCK_SECONDS` the training length (the embedded recipe is step-matched to the exported
run unless it was exported with its wallclock cap), `RUN_ID` names the run, and the run directory
(log.txt, result.json, artifact.pga, final_model.pt) is `RUN_DIR`, default `runs/<RUN_ID>`.
`torchrun` runs it with DDP exactly as `pgolf run`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_INT = {"SEED": ("seed",), "ITERATIONS": ("train", "iterations")}
ENV_FLOAT = {"MAX_WALLCLOCK_SECONDS": ("train", "max_wallclock_seconds")}


def challenge_data_path(vocab_size: int) -> str:
    """The challenge script's default DATA_PATH for a vocabulary."""
    return f"./data/datasets/fineweb10B_sp{vocab_size}"


def recipe_with_environment(recipe: Mapping[str, Any], iterations_by_seed: Mapping[str, int],
                            environ: Mapping[str, str]) -> dict[str, Any]:
    """The embedded recipe with the challenge's environment variables applied; a step-matched export
    trains each exported seed for the steps its run reached (`ITERATIONS` overrides)."""
    out = json.loads(json.dumps(recipe))
    vocab = int((out.get("model") or {}).get("vocab_size", 1024))
    data = out.setdefault("data", {})
    data["dir"] = environ.get("DATA_PATH") or challenge_data_path(vocab)
    data["tokenizer"] = environ.get("TOKENIZER_PATH") or None
    for table, convert in ((ENV_INT, int), (ENV_FLOAT, float)):
        for variable, path in table.items():
            if environ.get(variable):
                target = out
                for part in path[:-1]:
                    target = target.setdefault(part, {})
                target[path[-1]] = convert(environ[variable])
    seed = str(out.get("seed"))
    if seed in iterations_by_seed and not environ.get("ITERATIONS"):
        out.setdefault("train", {})["iterations"] = int(iterations_by_seed[seed])
    return out


def main(program_json: str, bundle_file: str | None = None, embedded: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Run the embedded recipe: every stage, the run directory written; returns result.json's content.
    `bundle_file` is the train_gpt.py running (its size is the code bytes), `embedded` its modules' sizes."""
    from pgolf import bundle
    from pgolf.config import Provenance
    from pgolf.host import run
    from pgolf.recipe import recipe_from_dict
    from pgolf.reporter import Reporter
    from pgolf.runtime import init_distributed

    if bundle_file is not None:
        bundle.running_bundle.update(path=bundle_file, modules=list(embedded or {}),
                                     embedded_bytes=sum((embedded or {}).values()))
    program = json.loads(program_json)
    data = recipe_with_environment(program["recipe"], program.get("iterations_by_seed") or {}, os.environ)
    recipe = recipe_from_dict(data, Provenance(default_file="train_gpt.py"))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = os.environ.get("RUN_ID") or f"{recipe.name}-seed{recipe.seed}-{stamp}"
    out_dir = Path(os.environ.get("RUN_DIR") or Path("runs") / run_id)
    reporter = Reporter(quiet=not init_distributed().is_main)
    reporter.log(f"seed:{recipe.seed} run_id:{run_id} data_path:{data['data']['dir']} run_dir:{out_dir}")
    return run(recipe, out_dir, reporter=reporter)

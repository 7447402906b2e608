"""Training step time of the baseline and of best.yaml, eager and compiled, against the challenge's own step.

The challenge's naive baseline trains 524,288 tokens per step in 43.5 ms on 8xH100 (its log:
`step_avg:43.54ms`; records/track_10min_16mb/2026-03-17_NaiveBaseline/train.log). One GPU doing the
same global batch (grad accumulation 8) would take about 8x that, so the reference for G visible GPUs
in one process is 43.5 ms x 8 / G per full step, scaled to the recipe's tokens per step. pgolf's step
is the host's own loop (`pgolf.loop.train`) with the recipe's optimizers and `compile_and_wrap`, so
what is measured is what `pgolf run` trains with.

On a GPU it runs at the recipe's own size (`--data DIR` with the challenge's shards); on a CPU only
at `--scale tiny`, where the reference is printed for scale but is not a target. Prints a table and
one JSON line last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pgolf.host import Session, compile_and_wrap, load_data, loop_hooks, new_model
from pgolf.loop import train
from pgolf.recipe import load_recipe
from pgolf.reporter import Reporter
from pgolf.runtime import sync

REPO = Path(__file__).resolve().parent.parent
BASELINE_STEP_MS_8XH100 = 43.54  # naive baseline, 524,288 tokens per step (its train.log)
BASELINE_TOKENS_PER_STEP = 524_288


def reference_ms(tokens_per_step: int, gpus: int) -> float:
    """The challenge baseline's step time for this many tokens on `gpus` H100s (linear in both)."""
    return BASELINE_STEP_MS_8XH100 * 8 / max(gpus, 1) * tokens_per_step / BASELINE_TOKENS_PER_STEP


def measure(recipe_path: Path, compiled: bool, steps: int, warmup: int, scale: str | None,
            overrides: list[str]) -> dict[str, object]:
    recipe = load_recipe(recipe_path, [f"train.iterations={steps}", "train.max_wallclock_seconds=0",
                                       f"train.warmup_steps={warmup}", "train.log_every=0",
                                       f"train.compile={'on' if compiled else 'off'}", *overrides], scale=scale)
    session = Session(recipe, reporter=Reporter(quiet=True))
    load_data(session)
    model = new_model(session)
    optimizers = session.hook.pgolf_provide_optimizers(model=model, ctx=session.ctx)
    wrapped = compile_and_wrap(session, model)
    sync(session.device)
    result = train(model, wrapped, optimizers, session.data, session.ctx, loop_hooks(session))
    step_ms = result.step_avg_ms
    tokens = recipe.train.batch_tokens
    return {"recipe": recipe.name, "mode": "compiled" if compiled else "eager", "step_ms": round(step_ms, 2),
            "tokens_per_second": round(tokens / (step_ms / 1000.0), 1), "tokens_per_step": tokens,
            "warmup_seconds": round(result.warmup_seconds, 2), "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="baseline.yaml,best.yaml")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps that also compile the graphs")
    parser.add_argument("--data", default=None, help="challenge shards (GPU runs at the recipe's own size)")
    parser.add_argument("--scale", default=None, help="default: none with CUDA, 'tiny' on a CPU")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    scale = args.scale or (None if gpus else "tiny")
    overrides = [*args.overrides, *([f"data.dir={args.data}"] if args.data else [])]
    rows = [measure(REPO / "recipes" / name, mode == "compiled", args.steps, args.warmup, scale, overrides)
            for name in args.recipes.split(",") for mode in args.modes.split(",")]
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    print(f"{'recipe':<10} {'mode':<9} {'step ms':>9} {'tokens/s':>12} {'vs 8xH100 baseline':>19}")
    for row in rows:
        ref = reference_ms(int(row["tokens_per_step"]), gpus or 1)
        row["reference_ms"] = round(ref, 2)
        row["ratio_to_reference"] = round(float(row["step_ms"]) / ref, 3)
        print(f"{row['recipe']:<10} {row['mode']:<9} {row['step_ms']:>9.1f} {row['tokens_per_second']:>12.0f} "
              f"{row['ratio_to_reference']:>18.2f}x")
    print(json.dumps({"benchmark": "gpu_step", "device": device, "gpus": gpus, "scale": scale,
                      "reference": f"{BASELINE_STEP_MS_8XH100} ms per 524,288-token step on 8xH100, x 8 / GPUs",
                      "rows": rows}))


if __name__ == "__main__":
    main()

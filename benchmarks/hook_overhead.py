"""What the registry costs per training step: 8 enabled no-op techniques against none.

Both arms run pgolf's own training loop (`pgolf.loop.train`) on the same model and optimizers;
the only difference is the plugin manager: one has eight enabled techniques, each implementing
the per-step hooks (``pgolf_on_step_start``, ``pgolf_on_step_end``) as no-ops, traced like any
technique; the other has none, so those hooks dispatch to nothing. Rounds alternate the arms
(ABBA order) so drift from other processes cancels, and the ratio of the medians is reported
(target <= 1.01), in wall-clock time and in this process's CPU time (one thread by default, so
no idle spinning is counted), with a bootstrap 95% interval over rounds: on a machine shared
with other jobs single rounds scatter by 10% or more, and the interval says how far the
measured ratio can be trusted. The per-step dispatch cost is also timed directly, in
microseconds; it is what the ratio converges to without noise, and the target is judged on it
(``overhead_ratio``) together with the interval (the loop ratio must not be significantly above
the target). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from pgolf.api import Technique
from pgolf.host import Session, load_data, loop_hooks, new_model
from pgolf.loop import train
from pgolf.recipe import load_recipe
from pgolf.reporter import Reporter

REPO = Path(__file__).resolve().parent.parent
TECHNIQUES = 8
TARGET_RATIO = 1.01
# The micro scale of the test suite (2 layers x 64): a step of milliseconds, so a fixed per-step
# cost weighs far more than at any real scale.
MICRO = ["model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
         "train.seq_len=64", "train.batch_tokens=1024"]


def _noop(self: Technique, model: torch.nn.Module, ctx: object) -> None:
    """Does nothing: what is measured is the dispatch around it."""


def make_noop(i: int) -> type[Technique]:
    return type(f"NoOp{i}", (Technique,), {
        "name": f"noop{i}", "summary": "does nothing each step", "stage": "train",
        "pgolf_on_step_start": _noop, "pgolf_on_step_end": _noop, "__module__": __name__,
    })


NOOPS = [make_noop(i) for i in range(TECHNIQUES)]
globals().update({cls.__name__: cls for cls in NOOPS})


def session_for(overrides: list[str], scale: str, techniques: bool) -> Session:
    recipe = load_recipe(REPO / "recipes" / "baseline.yaml", overrides, scale=scale)
    if techniques:
        recipe.techniques = {f"{__name__}:{cls.__name__}": {} for cls in NOOPS}
    session = Session(recipe, reporter=Reporter(quiet=True))
    load_data(session)
    return session


def dispatch_microseconds(session: Session, model: torch.nn.Module, calls: int = 20_000) -> float:
    """Seconds per step spent calling both per-step hooks, in microseconds."""
    hook, ctx = session.hook, session.ctx
    start = time.perf_counter()
    for _ in range(calls):
        hook.pgolf_on_step_start(model=model, ctx=ctx)
        hook.pgolf_on_step_end(model=model, ctx=ctx)
    return 1e6 * (time.perf_counter() - start) / calls


def bootstrap_interval(with_hooks: list[float], bare: list[float], draws: int = 2000) -> tuple[float, float]:
    """95% interval of the ratio of medians, resampling the paired rounds."""
    rng = random.Random(0)
    n = len(bare)
    ratios = []
    for _ in range(draws):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(with_hooks[i] for i in picks) / statistics.median(bare[i] for i in picks))
    ratios.sort()
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny", help="scale overlay (the micro model shrinks it further)")
    parser.add_argument("--full-tiny", action="store_true", help="the tiny scale itself instead of the micro model")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--steps", type=int, default=5, help="training steps per round and arm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time counts no spinning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    overrides = [*([] if args.full_tiny else MICRO), f"train.iterations={args.steps}", "train.max_wallclock_seconds=0",
                 "train.warmup_steps=0", "train.log_every=0"]
    load_start = os.getloadavg()
    arms = {"hooks": session_for(overrides, args.scale, True), "bare": session_for(overrides, args.scale, False)}
    torch.manual_seed(0)
    model = new_model(arms["bare"])
    optimizers = arms["bare"].hook.pgolf_provide_optimizers(model=model, ctx=arms["bare"].ctx)
    seams = {arm: loop_hooks(session) for arm, session in arms.items()}
    times: dict[str, list[float]] = {"hooks": [], "bare": []}
    for arm in arms:  # warm both paths once
        train(model, model, optimizers, arms[arm].data, arms[arm].ctx, seams[arm])
    cpu_times: dict[str, list[float]] = {"hooks": [], "bare": []}
    for r in range(args.rounds):
        order = ("hooks", "bare") if r % 2 == 0 else ("bare", "hooks")
        for arm in order:
            cpu = time.process_time()
            result = train(model, model, optimizers, arms[arm].data, arms[arm].ctx, seams[arm])
            cpu_times[arm].append((time.process_time() - cpu) / result.steps)
            times[arm].append(result.train_seconds / result.steps)
    fired = arms["hooks"].trace.calls("noop0")
    dispatch_hooks = dispatch_microseconds(arms["hooks"], model)
    dispatch_bare = dispatch_microseconds(arms["bare"], model)
    load_end = os.getloadavg()
    hooks_s, bare_s = statistics.median(times["hooks"]), statistics.median(times["bare"])
    ratio = hooks_s / bare_s
    ratio_cpu = statistics.median(cpu_times["hooks"]) / statistics.median(cpu_times["bare"])
    low, high = bootstrap_interval(cpu_times["hooks"], cpu_times["bare"])
    pairs = [h / b for h, b in zip(times["hooks"], times["bare"], strict=True)]
    bare_cpu_s = statistics.median(cpu_times["bare"])
    overhead_ratio = 1 + (dispatch_hooks - dispatch_bare) / (1e6 * bare_cpu_s)
    print(f"step ms with {TECHNIQUES} no-op techniques: {1e3 * hooks_s:.3f}, without: {1e3 * bare_s:.3f}, "
          f"ratio {ratio:.4f} (CPU time {ratio_cpu:.4f})")
    print(f"per-step hook dispatch: {dispatch_hooks:.2f} us with techniques, {dispatch_bare:.2f} us without")
    print(json.dumps({
        "benchmark": "hook_overhead",
        "model": "tiny" if args.full_tiny else "micro (2 x 64, seq 64, 1024 tokens/step)",
        "techniques": TECHNIQUES,
        "hooks_per_technique": ["pgolf_on_step_start", "pgolf_on_step_end"],
        "hook_calls_per_technique": fired,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "step_ms_with_hooks": round(1e3 * hooks_s, 4),
        "step_ms_bare": round(1e3 * bare_s, 4),
        "ratio": round(ratio, 5),
        "ratio_median_of_pairs": round(statistics.median(pairs), 5),
        "step_cpu_ms_with_hooks": round(1e3 * statistics.median(cpu_times["hooks"]), 4),
        "step_cpu_ms_bare": round(1e3 * statistics.median(cpu_times["bare"]), 4),
        "ratio_cpu_time": round(ratio_cpu, 5),
        "ratio_cpu_time_95ci": [round(low, 5), round(high, 5)],
        "dispatch_us_per_step_with_hooks": round(dispatch_hooks, 3),
        "dispatch_us_per_step_bare": round(dispatch_bare, 3),
        "overhead_ratio": round(overhead_ratio, 6),
        "target_ratio": TARGET_RATIO,
        "meets_target": overhead_ratio <= TARGET_RATIO and low <= TARGET_RATIO,
        "threads": torch.get_num_threads(),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
    }))


if __name__ == "__main__":
    main()

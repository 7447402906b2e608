"""Tiny-scale CPU training throughput, and model FLOPs utilisation against the measured matmul peak.

What counts as model FLOPs (per training token; nothing else is counted):
- ``6 * N``: N = the weights that multiply activations in a matmul: every block's attention
  (c_q, c_k, c_v, proj) and MLP (fc, proj) matrices plus the output projection (the tied
  embedding used as the head, vocab x dim). 2 FLOPs per weight forward, 4 backward.
- ``6 * L * T * d``: causal attention: the scores QK^T and the weighted sum AV, each 2*d FLOPs
  per (query, key) pair, over the T/2 keys a query sees on average; forward once, backward twice.
  The PaLM convention (``12 * L * T * d``, the full square) is reported alongside.
Not counted: the embedding lookup (a gather), norms, residual scales, softcap, softmax and the
loss, and the optimizer (Muon's Newton-Schulz iterations add roughly 10% more matmul work at
this scale); so the MFU is a lower bound on how busy the matmul units are.

The peak is the best float32 ``torch.mm`` rate on square matrices, with the same threads. Each
round measures the peak and then a few real training steps (pgolf's own loop, recipe and
optimizers) back to back; a round's MFU divides the steps' achieved rate by that round's peak,
so load from other processes weighs on both alike. The median round is reported, with the load
average before and after. On a shared machine the wall clock also counts time the process spent
descheduled, so the same ratio is reported in CPU time of this process (``mfu_cpu_time``: model
FLOPs per CPU-second over matmul FLOPs per CPU-second); with one thread it is immune to load.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from pgolf.host import Session, load_data, loop_hooks, new_model
from pgolf.loop import train
from pgolf.model import GPT
from pgolf.recipe import load_recipe
from pgolf.reporter import Reporter

REPO = Path(__file__).resolve().parent.parent
TARGET_MFU = 0.5


def matmul_weights(model: GPT) -> int:
    """N: weights used as matmul operands (block matrices plus the output projection)."""
    blocks = sum(p.numel() for name, p in model.named_parameters()
                 if name.startswith(("blocks.", "extra_blocks.")) and p.ndim == 2 and name.endswith(".weight"))
    head = model.tok_emb.weight.numel() if model.lm_head is None else model.lm_head.weight.numel()
    return blocks + head


def model_flops_per_token(model: GPT, seq_len: int) -> tuple[float, float]:
    """(causal count, PaLM full-square count) of training FLOPs per token."""
    cfg = model.cfg
    dense = 6.0 * matmul_weights(model)
    attention_full = 12.0 * cfg.num_layers * seq_len * cfg.model_dim
    return dense + attention_full / 2, dense + attention_full


def matmul_peak(seconds: float, sizes: tuple[int, ...] = (512, 1024, 2048)) -> tuple[float, float]:
    """Best float32 square-matmul rate over a few sizes within about `seconds`: (per wall second,
    per CPU second of this process)."""
    best_wall = best_cpu = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)  # warm
        deadline = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < deadline:
            wall, cpu = time.perf_counter(), time.process_time()
            torch.mm(a, b, out=out)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best_wall = max(best_wall, 2.0 * n**3 / wall)
            if cpu > 0.005:  # process_time ticks are coarse; short calls only bound the wall rate
                best_cpu = max(best_cpu, 2.0 * n**3 / cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "best.yaml"))
    parser.add_argument("--scale", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--peak-seconds", type=float, default=1.5, help="matmul peak search per round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    recipe = load_recipe(args.recipe, [f"train.iterations={args.steps}", "train.max_wallclock_seconds=0",
                                       "train.warmup_steps=0", "train.log_every=0", *args.overrides], scale=args.scale)
    session = Session(recipe, reporter=Reporter(quiet=True))
    load_data(session)
    model = new_model(session)
    optimizers = session.hook.pgolf_provide_optimizers(model=model, ctx=session.ctx)
    seams = loop_hooks(session)
    causal, palm = model_flops_per_token(model, recipe.train.seq_len)
    tokens_per_step = recipe.train.batch_tokens
    train(model, model, optimizers, session.data, session.ctx, seams)  # first-touch allocations and lazy init, not timed

    rounds = []
    for _ in range(args.rounds):
        peak, peak_cpu = matmul_peak(args.peak_seconds)
        cpu = time.process_time()
        result = train(model, model, optimizers, session.data, session.ctx, seams)
        step_cpu = (time.process_time() - cpu) / result.steps
        step_s = result.train_seconds / result.steps
        achieved = causal * tokens_per_step / step_s
        rounds.append({"peak_gflops": peak / 1e9, "step_seconds": step_s, "achieved_gflops": achieved / 1e9,
                       "mfu": achieved / peak, "step_cpu_seconds": step_cpu,
                       "mfu_cpu_time": causal * tokens_per_step / step_cpu / peak_cpu})
    load_end = os.getloadavg()

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    step_s = median("step_seconds")
    mfu = median("mfu")
    print(f"{'round':>5} {'peak GF/s':>10} {'step s':>8} {'model GF/s':>11} {'MFU':>6}")
    for i, r in enumerate(rounds):
        print(f"{i:>5} {r['peak_gflops']:>10.1f} {r['step_seconds']:>8.3f} {r['achieved_gflops']:>11.1f} {r['mfu']:>6.3f}")
    print(json.dumps({
        "benchmark": "cpu_throughput",
        "recipe": recipe.name,
        "scale": args.scale,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "tokens_per_step": tokens_per_step,
        "step_seconds_median": round(step_s, 4),
        "tokens_per_second": round(tokens_per_step / step_s, 1),
        "matmul_weights": matmul_weights(model),
        "model_flops_per_token": causal,
        "model_flops_per_token_palm": palm,
        "peak_gflops_median": round(median("peak_gflops"), 2),
        "achieved_gflops_median": round(median("achieved_gflops"), 2),
        "mfu_median": round(mfu, 4),
        "mfu_palm_median": round(mfu * palm / causal, 4),
        "mfu_rounds": [round(r["mfu"], 4) for r in rounds],
        "step_cpu_seconds_median": round(median("step_cpu_seconds"), 4),
        "mfu_cpu_time_median": round(median("mfu_cpu_time"), 4),
        "target_mfu": TARGET_MFU,
        "meets_target": mfu >= TARGET_MFU,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
    }))


if __name__ == "__main__":
    main()

"""Evaluation throughput at the tiny scale: plain, sliding, sliding + SGD TTT, each LoRA TTT mode, + PPM.

The model is the tiny recipe's GPT (4 layers x 256, eval length 256) with its initial weights
(speed does not depend on what it learnt); the stream is the first `--tokens` validation tokens
of the embedded corpus. Each arm scores the same stream through the code `pgolf run` uses (the
host's window scorer, or the ttt scorers, then the ppm transform) and reports scored targets per
second in wall-clock and CPU time, and its cost relative to the plain evaluation. TTT runs at
the tiny-scale settings proposed for recipes/scales/tiny.yaml. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pgolf.context import DataView, RunContext
from pgolf.data.dataset import load_dataset
from pgolf.model import build_model
from pgolf.recipe import load_recipe
from pgolf.scores import EvalWindows, Scorer, TokenScores, WindowScorer, plain_windows
from pgolf_plugins.ppm import PPM, PPMConfig
from pgolf_plugins.sliding_window import sliding_windows
from pgolf_plugins.ttt import ChunkedSGDScorer, DocumentLoRAScorer, TTTConfig, TTTStats

REPO = Path(__file__).resolve().parent.parent
TINY_SGD = TTTConfig(mode="sgd", chunk_tokens=4096, batch_seqs=8, lr=0.02)
TINY_LORA = TTTConfig(mode="lora", lora_rank=8, lora_chunk=128, lora_batch_docs=16, order="stream")
TINY_PHASED = replace(TINY_LORA, phases=3, prefix_docs=24, chunk_tokens=2048, lr=0.001, epochs=1)
LORA_ARMS = {
    "ttt_lora": TINY_LORA,
    "ttt_lora_fresh_a": replace(TINY_LORA, lora_warm_a=False),
    "ttt_lora_length_order": replace(TINY_LORA, order="length"),
    "ttt_lora_short_chunks": replace(TINY_LORA, lora_short_chunks=[[256, 8], [2000, 24]]),
    "ttt_phased": TINY_PHASED,
    "ttt_phased_length_order": replace(TINY_PHASED, order="length"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(REPO / "recipes" / "baseline.yaml", scale="tiny")
    data = load_dataset(None, None, recipe.model.vocab_size)
    ctx = RunContext(recipe=recipe, device=torch.device("cpu"), data=DataView(data.bos_id, data.vocab_size, data))
    tokens = data.val_tokens[: args.tokens + 1]
    counts = data.val_bytes[: args.tokens + 1]
    torch.manual_seed(recipe.seed)
    base = build_model(recipe.model, bos_id=data.bos_id).float().eval()
    seq_len = recipe.eval_seq_len

    def arm(scorer: Scorer, windows: EvalWindows, ppm: bool = False) -> dict[str, float]:
        model = copy.deepcopy(base)
        scores = TokenScores.empty(tokens, counts)
        wall, cpu = time.perf_counter(), time.process_time()
        windows = scorer.windows_for(windows, tokens, ctx)  # as the host: document LoRA scores its own
        scores.windows = windows
        scorer(model, scores, windows, ctx)
        mixing = time.process_time()
        if ppm:
            PPM(PPMConfig()).pgolf_on_scores(scores=scores, ctx=ctx)
        mixing = time.process_time() - mixing
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        scored = int(scores.scored.sum())
        out = {"targets": scored, "seconds_wall": round(wall, 3), "seconds_cpu": round(cpu, 3),
               "tokens_per_s_wall": round(scored / wall), "tokens_per_s_cpu": round(scored / cpu)}
        return {**out, "ppm_seconds_cpu": round(mixing, 3)} if ppm else out

    plain = plain_windows(tokens.shape[0], seq_len)
    sliding = sliding_windows(tokens.shape[0], seq_len, 64)
    arm(WindowScorer(), plain)  # warm-up: first-call allocations are not the plain arm's cost
    arms = {
        "plain": arm(WindowScorer(), plain),
        "sliding": arm(WindowScorer(), sliding),
        "sliding_ttt_sgd": arm(ChunkedSGDScorer(TINY_SGD, TTTStats("sgd")), sliding),
        **{name: arm(DocumentLoRAScorer(cfg, TTTStats("lora")), plain) for name, cfg in LORA_ARMS.items()},
        "plain_ppm": arm(WindowScorer(), plain, ppm=True),
    }
    reference = arms["plain"]["tokens_per_s_cpu"]
    for values in arms.values():
        values["cpu_cost_vs_plain"] = round(reference / values["tokens_per_s_cpu"], 2)
    print(json.dumps({"benchmark": "eval", "scale": "tiny", "tokens": int(tokens.shape[0] - 1),
                      "threads": torch.get_num_threads(), "arms": arms,
                      "ttt_sgd": {"chunk_tokens": TINY_SGD.chunk_tokens, "epochs": TINY_SGD.epochs},
                      "ttt_lora": {"rank": TINY_LORA.lora_rank, "chunk": TINY_LORA.lora_chunk,
                                   "batch_docs": TINY_LORA.lora_batch_docs},
                      "ttt_phased": {"phases": TINY_PHASED.phases, "prefix_docs": TINY_PHASED.prefix_docs,
                                     "chunk_tokens": TINY_PHASED.chunk_tokens},
                      "val_fraction": round(float(np.float64(tokens.shape[0]) / data.val_tokens.shape[0]), 3)}))


if __name__ == "__main__":
    main()

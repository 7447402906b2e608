"""Frequency weighting: spend precision (or loss) where the training text's frequent tokens are.

No accepted record uses it; the variants come from PRs (reference/techniques.md §3):

- ``embed_quant`` (PR #898, 1.1217 on 4 seeds, not isolated): the embedding rows of the top-K most
  frequent tokens at int8, the rest at int6. The per-row widths are stored in the artifact (the
  host writes a ``row_bits`` part for any spec with row groups) and counted in its bytes.
- ``hessian`` (PR #1042, closed): GPTQ Hessian rows from positions whose *input* token is in the
  top-K are weighted up (boost 2 = counted twice), through ``pgolf_contribute_calibration_weights``,
  which the host calls once per calibration batch while it collects the calibration Hessians
  (provided by gptq).
- ``loss`` (PR #1519 byte-length weights; #1360's Gaussian reweighting was +0.0143 worse): per-token
  training loss weights, by byte length or by inverse frequency^α. Evaluation stays unweighted.

Frequencies are counted on training shards only: the tokens come from
``ctx.data.train_shard_tokens("frequency")``, which never yields a validation shard and records
every read in the run's data ledger under "frequency". `count_token_frequencies` is the
functional core: counts over any iterable of token arrays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from pgolf.api import DataError, QuantSpec, RunContext, Stage, Technique, build_byte_tables, load_tokenizer

EMBEDDING_NAMES = ("tok_emb.weight", "lm_head.weight")


def count_token_frequencies(token_arrays: Iterable[np.ndarray], vocab_size: int,
                            max_tokens: int | None = None) -> np.ndarray:
    """Unigram counts [vocab_size] over the first `max_tokens` tokens of `token_arrays`, in order.

    Stops taking arrays once `max_tokens` are counted, so a lazy source (the run's training
    shards, ``ctx.data.train_shard_tokens``) reads no more than it needs. The caller guarantees the
    arrays are training tokens: frequency statistics from validation data would leak the answer
    into the artifact (condition 1 of the challenge's Issue #1017).
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    remaining = max_tokens
    seen = False
    for tokens in token_arrays:
        seen = True
        if remaining is not None:
            tokens = tokens[:remaining]
            remaining -= tokens.shape[0]
        counts += np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)
        if remaining is not None and remaining <= 0:
            break
    if not seen:
        raise DataError("no training shards to count token frequencies on")
    return counts


def top_tokens(counts: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most frequent tokens; ties go to the lower id (a stable sort)."""
    return np.argsort(-np.asarray(counts), kind="stable")[:k]


def add_row_group(spec: QuantSpec, rows: np.ndarray, top_bits: int, rest_bits: int | None) -> None:
    """The chosen rows at `top_bits`, the others at `rest_bits` (None keeps the spec's width)."""
    if rest_bits is not None:
        spec.bits = rest_bits
    spec.row_groups.append((torch.as_tensor(np.sort(rows), dtype=torch.long), top_bits))
    spec.note("freq_weighting", f"{len(rows)} frequent rows int{top_bits}, rest int{spec.bits}")


def position_weights(input_ids: Tensor, frequent: Tensor, boost: float) -> Tensor:
    """Weight `boost` where the input token is frequent, 1 elsewhere (same shape as input_ids)."""
    hit = torch.isin(input_ids, frequent.to(input_ids.device))
    return torch.where(hit, torch.tensor(boost, device=input_ids.device), torch.tensor(1.0, device=input_ids.device))


def inverse_frequency_weights(counts: np.ndarray, alpha: float) -> Tensor:
    """w_t = (count_t + 1)^-α, scaled so the average weight over the counted tokens is 1."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    w = (c + 1.0) ** (-alpha)
    mean = (w * c).sum() / c.sum().clamp_min(1.0)
    return (w / mean).float()


def byte_length_weights(base_bytes: np.ndarray, vocab_size: int) -> Tensor:
    """PR #1519: w_t = max(bytes of token t, 1), so the loss is charged per byte, like BPB."""
    return torch.as_tensor(np.maximum(np.asarray(base_bytes[:vocab_size], dtype=np.float32), 1.0))


@dataclass
class FreqWeightingConfig:
    mode: Literal["embed_quant", "hessian", "loss"] = "embed_quant"  # #898 / #1042 / #1519
    top_k: int = 100  # #898 and #1042 (their 100 SP1024 ids "cover ~53% of all text")
    top_bits: int = 8  # #898: frequent embedding rows int8
    rest_bits: int | None = 6  # #898: the other rows int6; None keeps the width other techniques set
    hessian_boost: float = 2.0  # #1042: frequent positions' rows scaled by sqrt(2)
    loss_weighting: Literal["bytes", "inverse_frequency"] = "bytes"  # #1519 weighted by bytes
    alpha: float = 0.5  # exponent of inverse_frequency (no record; 0 = unweighted)
    count_tokens: int = 100_000_000  # one challenge shard
    reserve_seconds: float = 1.0  # counting at export is charged to training time (embed_quant, hessian)


class FreqWeighting(Technique):
    name = "freq_weighting"
    summary = "Token frequencies from training shards steer embedding-row bits, GPTQ Hessian rows, or loss weights."
    Config = FreqWeightingConfig
    stage = "export"
    after = ("sandwich_quant",)
    before = ("sdclip", "gptq")
    follows = "PR #898 (embedding rows, 1.1217, not isolated), PR #1042 (Hessian boost), PR #1519 (byte-weighted loss)"

    def __init__(self, config: FreqWeightingConfig | None = None) -> None:
        super().__init__(config)
        self.counts: np.ndarray | None = None
        self._frequent: Tensor | None = None

    def stage_for(self) -> Stage:
        return "train" if self.config.mode == "loss" else "export"

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c, vocab, problems = self.config, ctx.recipe.model.vocab_size, []
        if not 1 <= c.top_k <= vocab:
            problems.append(f"techniques.freq_weighting: top_k must lie in 1..{vocab} (the vocabulary size).")
        if not all(2 <= b <= 8 for b in (c.top_bits, c.rest_bits or c.top_bits)):
            problems.append("techniques.freq_weighting: top_bits and rest_bits must lie in 2..8.")
        if c.hessian_boost <= 0 or c.alpha < 0 or c.count_tokens <= 0:
            problems.append("techniques.freq_weighting: hessian_boost and count_tokens must be positive, alpha >= 0.")
        if c.mode == "hessian" and "gptq" not in ctx.recipe.techniques:
            problems.append("techniques.freq_weighting: mode hessian weights the calibration Hessians, which need a "
                            "technique that provides calibration batches; enable gptq or choose mode embed_quant "
                            "or loss.")
        if c.mode != "loss" and ctx.recipe.train.max_wallclock_seconds > 0 and c.reserve_seconds <= 0:
            problems.append("techniques.freq_weighting: counting training tokens at export is charged to the "
                            "training budget; set reserve_seconds > 0.")
        return problems

    def count(self, ctx: RunContext) -> np.ndarray:
        if self.counts is None:
            self.counts = count_token_frequencies(ctx.data.train_shard_tokens("frequency"), ctx.data.vocab_size,
                                                  self.config.count_tokens)
            self._frequent = torch.as_tensor(top_tokens(self.counts, self.config.top_k), dtype=torch.long)
            covered = self.counts[self._frequent.numpy()].sum() / max(int(self.counts.sum()), 1)
            ctx.log(f"freq_weighting: top {self.config.top_k} tokens cover {covered:.1%} of "
                    f"{int(self.counts.sum()):,} training tokens")
        return self.counts

    # train (mode: loss) ---------------------------------------------------------------------

    def pgolf_contribute_loss_weights(self, ctx: RunContext) -> Tensor | None:
        c = self.config
        if c.mode != "loss":
            return None
        if c.loss_weighting == "bytes":
            data = ctx.data
            tables = build_byte_tables(load_tokenizer(data.tokenizer_path, data.vocab_size), data.vocab_size)
            return byte_length_weights(tables.base_bytes, data.vocab_size)
        return inverse_frequency_weights(self.count(ctx), c.alpha)

    # export (modes: embed_quant, hessian) ---------------------------------------------------

    def pgolf_contribute_train_reserve_seconds(self, ctx: RunContext) -> float | None:
        return self.config.reserve_seconds if self.config.mode != "loss" else None

    def pgolf_on_export_start(self, model: nn.Module, ctx: RunContext) -> None:
        if self.config.mode != "loss":
            self.count(ctx)

    def pgolf_on_quant_spec(self, name: str, tensor: Tensor, spec: QuantSpec, ctx: RunContext) -> None:
        if self.config.mode != "embed_quant" or name not in EMBEDDING_NAMES or spec.scheme != "int" or tensor.ndim != 2:
            return
        assert self._frequent is not None, "frequencies are counted at export start"
        add_row_group(spec, self._frequent.numpy(), self.config.top_bits, self.config.rest_bits)

    def pgolf_contribute_calibration_weights(self, input_ids: Tensor, ctx: RunContext) -> Tensor | None:
        if self.config.mode != "hessian":
            return None
        assert self._frequent is not None, "frequencies are counted at export start"
        return position_weights(input_ids, self._frequent, self.config.hessian_boost)

"""Full-Hessian GPTQ: quantize a matrix column by column, pushing each column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's inputs.

The records' lineage (reference/techniques.md §0.7, challenge.md §2.4): PR #535/#609 introduced
full-Hessian GPTQ, PR #1019 calibrated it on text the model generates itself, PR #1060 onwards on
training shards inside the training budget (a reserve taken off the wallclock), and from PR #1394
the tied embedding is GPTQ'd too, with a Hessian from the final norm's output (the embedding is the
output projection there). #1626 trimmed calibration to 16 batches and a 4 s reserve.

GPTQ supplies the calibration batches (`pgolf_provide_calibration_batches`); the host collects the
mean Hessians ``E[XᵀX]`` from them once per export (`ctx.services.calibration_hessians()`, with
`pgolf.api.collect_hessians`: a layer run several times per forward adds every pass), so sdclip and
freq_weighting see the same statistics without reaching into this module.

Functional core, usable without the registry:

- `self_generate`: autoregressive calibration text (PR #1019: 64 sequences x 2048 tokens, T=0.8).
- `factorize` + `gptq_codes`: damping 0.01·mean(diag H), act-order, the upper Cholesky factor of
  H⁻¹, blocks of 128 columns with lazy updates.
- `gptq_quantize`: a `QuantSpec` (bits, clip rule, scale floor, per-row clip factor, row groups of
  other widths) -> the same `int_rows` tensor the host's round-to-nearest writes, so any spec
  another technique sets is honoured and the artifact format does not change; a spec's wider column
  groups (awq_lite) are coded at their own width and scale inside the same solve, as #1908 does.

Where pgolf departs from the records' `gptq_quantize_weight` (#1394-#2135), on purpose: a dead
column (diag(H) = 0, an input that never fired during calibration) gets the live columns' mean
diagonal instead of the records' constant 1 (`pgolf.api.damped_hessian`), so the damping
0.01·mean(diag H) and hence every code is invariant to scaling H; with no dead column the two
rules are identical. Act-order ties keep column order (a stable sort); the records' sort is not
stable. Both quantize a dead column's weights to 0.

Calibration batches default to 32, as #2135 (`GPTQ_CALIBRATION_BATCHES=32`, the record's only
change over #2130, which used the 16 of #1626-#1868).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pgolf.api import (
    QuantizedTensor,
    QuantSpec,
    RunContext,
    Technique,
    col_group_mask,
    damped_hessian,
    int_rows_tensor,
    qmax,
    scales_from_clip,
    spec_row_scales,
)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10 when H is numerically not positive definite


# --- self-generated calibration text --------------------------------------------------------------


@torch.no_grad()
def self_generate(
    model: nn.Module,
    num_seqs: int,
    seq_len: int,
    temperature: float,
    seed: int,
    bos_id: int,
    device: torch.device,
    batch_size: int = 8,
    context_len: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> Tensor:
    """Sample `num_seqs` sequences of `seq_len` tokens from the model itself, each starting at BOS.

    PR #1019's calibration source: no training or validation token is read. Every training
    document starts with BOS, so sampling from BOS gives document-like text (the record started
    from a random token). Sampling uses its own seeded generator, so the text is reproducible.
    """
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = []
    try:
        for start in range(0, num_seqs, batch_size):
            rows = min(batch_size, num_seqs - start)
            seq = torch.full((rows, 1), bos_id, dtype=torch.long, device=device)
            for _ in range(seq_len - 1):
                window = seq if context_len is None else seq[:, -context_len:]
                with autocast() if autocast is not None else contextlib.nullcontext():
                    logits = model.logits(model.forward_hidden(window)[:, -1:])
                probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
                seq = torch.cat([seq, torch.multinomial(probs, 1, generator=gen)], dim=1)
            out.append(seq)
    finally:
        model.train(was_training)
    return torch.cat(out)


# --- the GPTQ core ---------------------------------------------------------------------------------


@dataclass
class GPTQFactor:
    """What GPTQ needs from a Hessian, independent of the scales (cached across re-quantizations)."""

    perm: Tensor  # column order (act-order: descending diag(H))
    inv_perm: Tensor
    dead: Tensor  # columns never activated (diag(H) == 0): their weights are dropped
    upper: Tensor  # upper Cholesky factor of H⁻¹ in permuted order


def factorize(hessian: Tensor, damp: float = 0.01, act_order: bool = True) -> GPTQFactor:
    h, dead = damped_hessian(hessian, damp)
    cols = h.shape[0]
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        perm = torch.arange(cols, device=h.device)
    h = h[perm][:, perm]
    eye = torch.eye(cols, device=h.device, dtype=h.dtype)
    extra = damp * h.diagonal().mean()
    for _ in range(MAX_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h = h + extra * eye
        extra = extra * 10
    else:
        raise ValueError("the Hessian stays indefinite after damping; calibration data may be degenerate")
    upper = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    return GPTQFactor(perm=perm, inv_perm=torch.argsort(perm), dead=dead, upper=upper)


@contextlib.contextmanager
def single_threaded_on_cpu(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of vector ops of a few hundred elements: intra-op threads only
    add synchronisation (on a busy 2-core machine they made it 100x slower), so the CPU loop runs
    on one thread and restores the setting afterwards."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_codes(
    weight: Tensor,
    factor: GPTQFactor,
    scale: Tensor,
    row_qmax: Tensor,
    clip: Tensor | None = None,
    block_size: int = 128,
    col_mask: Tensor | None = None,
    col_scale: Tensor | None = None,
    col_qmax: float = 0.0,
) -> Tensor:
    """Integer codes of `weight` [rows, cols] under per-row `scale` and code range ±`row_qmax`.

    Columns in `col_mask` use the per-row `col_scale` and range ±`col_qmax` instead, inside the
    same solve (AWQ-lite's protected groups, #1908).

    Each column is rounded (after clipping to ±`clip` per row, as round-to-nearest does), and its
    error, divided by the factor's diagonal, is subtracted from the later columns along that
    factor row: within a block at once, across blocks in one matrix product. The work is done on
    the transpose, so every column is a contiguous vector.
    """
    device = factor.upper.device
    w = weight.detach().to(device=device, dtype=torch.float32)[:, factor.perm].t().contiguous()  # [cols, rows]
    w[factor.dead[factor.perm]] = 0
    cols, rows = w.shape
    s = scale.to(device=device, dtype=torch.float32)
    r = row_qmax.to(device=device, dtype=torch.float32)
    c = clip.to(device=device, dtype=torch.float32) if clip is not None else None
    wide = col_mask[factor.perm].tolist() if col_mask is not None else [False] * cols
    s_wide = col_scale.to(device=device, dtype=torch.float32) if col_scale is not None else s
    r_wide = torch.full_like(r, col_qmax)
    codes = torch.empty(cols, rows, dtype=torch.float32, device=device)
    u = factor.upper
    with single_threaded_on_cpu(device):
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            block = w[i1:i2]  # a view: updates land in w
            errs = torch.empty(i2 - i1, rows, dtype=torch.float32, device=device)
            ub = u[i1:i2, i1:i2]
            for j in range(i2 - i1):
                col = block[j]
                target = torch.clamp(col, -c, c) if c is not None else col
                sj, rj = (s_wide, r_wide) if wide[i1 + j] else (s, r)
                q = torch.clamp(torch.round(target / sj), -rj, rj)
                codes[i1 + j] = q
                err = (col - q * sj) / ub[j, j]
                errs[j] = err
                block[j + 1 :].addr_(ub[j, j + 1 :], err, alpha=-1.0)
            if i2 < cols:
                w[i2:].addmm_(u[i1:i2, i2:].t(), errs, alpha=-1.0)
    return codes.t()[:, factor.inv_perm].to(torch.int8).cpu().contiguous()


def spec_scales(w32: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(fp16 scale, code range, clip value, bits) per row, by the same rules as round-to-nearest."""
    scale, bits, clip = spec_row_scales(w32, spec)
    row_qmax = (2 ** (bits - 1) - 1).to(torch.float32)
    return scale.to(torch.float16), row_qmax, clip, bits


def gptq_quantize(
    weight: Tensor,
    factor: GPTQFactor,
    spec: QuantSpec,
    block_size: int = 128,
) -> QuantizedTensor:
    """A 2-D weight under `spec`, GPTQ'd, as the host's `int_rows` tensor (codes + fp16 scales).

    The scale is rounded to fp16 before quantizing, as the records do, so the error GPTQ
    propagates is the error the artifact really has.
    """
    t = weight.detach().cpu()
    w32 = t.float()
    scale16, row_qmax, clip, bits = spec_scales(w32, spec)
    col_scale16 = scales_from_clip(clip, spec, spec.col_group_bits).to(torch.float16) if spec.col_groups else None
    codes = gptq_codes(w32, factor, scale16.float(), row_qmax, clip if spec.clip != "none" else None, block_size,
                       col_mask=col_group_mask(w32.shape[1], spec) if spec.col_groups else None,
                       col_scale=col_scale16.float() if col_scale16 is not None else None,
                       col_qmax=float(qmax(spec.col_group_bits)))
    return int_rows_tensor(t, codes, scale16, bits, spec, col_scale16, quantizer="gptq")


def spec_digest(weight: Tensor, spec: QuantSpec) -> str:
    """Identifies (weight, effective scales, ranges, clips) so an identical request reuses its codes."""
    scale16, row_qmax, clip, _ = spec_scales(weight.float(), spec)
    h = hashlib.sha1()
    for t in (weight.detach().float().contiguous(), scale16, row_qmax, clip.float()):
        h.update(t.cpu().numpy().tobytes())
    h.update(spec.clip.encode())
    h.update(repr((spec.col_groups, spec.col_group_size, spec.col_group_bits)).encode())
    return h.hexdigest()


# --- the plugin ------------------------------------------------------------------------------------


@dataclass
class GPTQConfig:
    # "train": training shards inside the training budget (#1060, #1394, #1626); "self_generated":
    # text the model samples after training (#1019), which reads no data at all.
    calibration: Literal["train", "self_generated"] = "train"
    calibration_batches: int = 32  # #2135 GPTQ_CALIBRATION_BATCHES=32 (#1626-#2130: 16, #1394: 64); per-rank micro-batches
    reserve_seconds: float = 4.0  # #1626; taken off the wallclock so calibration fits the 600 s
    self_gen_sequences: int = 64  # #1019
    self_gen_seq_len: int = 2048  # #1019
    self_gen_temperature: float = 0.8  # #1019
    self_gen_batch: int = 8  # #1019
    self_gen_seed: int | None = None  # None = the run's seed, as #1019
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True


class GPTQ(Technique):
    name = "gptq"
    summary = "Full-Hessian GPTQ on every quantized matrix and the tied embedding, honouring other techniques' specs."
    Config = GPTQConfig
    stage = "export"
    after = ("sandwich_quant", "freq_weighting", "sdclip")
    follows = "#1019 (AR self-gen, -0.0046 bpb with XSA-all/BigramHash), #1060/#1394/#1626 (train calibration in budget)"

    def __init__(self, config: GPTQConfig | None = None) -> None:
        super().__init__(config)
        self._hessians: Mapping[str, Tensor] | None = None
        self._factors: dict[str, GPTQFactor] = {}
        self._memo: dict[str, tuple[str, QuantizedTensor]] = {}
        self._info: dict[str, Any] = {}
        self._calibration_start: float | None = None

    # configure -----------------------------------------------------------------------------

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        c, problems = self.config, []
        if c.calibration_batches <= 0 or c.self_gen_sequences <= 0 or c.self_gen_seq_len < 2 or c.self_gen_batch <= 0:
            problems.append("techniques.gptq: calibration_batches, self_gen_sequences and self_gen_batch must be "
                            "positive and self_gen_seq_len at least 2.")
        if c.block_size <= 0 or c.damp <= 0 or c.self_gen_temperature <= 0:
            problems.append("techniques.gptq: block_size, damp and self_gen_temperature must be positive.")
        if c.calibration == "train" and ctx.recipe.train.max_wallclock_seconds > 0 and c.reserve_seconds <= 0:
            problems.append("techniques.gptq: calibrating on training shards must fit in the training budget; set "
                            "reserve_seconds > 0 (the records used 4-12 s) or calibration: self_generated.")
        return problems

    def pgolf_contribute_train_reserve_seconds(self, ctx: RunContext) -> float | None:
        return self.config.reserve_seconds if self.config.calibration == "train" else None

    # export --------------------------------------------------------------------------------

    def pgolf_on_export_start(self, model: nn.Module, ctx: RunContext) -> None:
        """Training-shard calibration runs here, where the host charges it to training time.

        Self-generated calibration reads no data, so like the record it runs after training: on
        the first Hessian request (the first `pgolf_quantize_tensor`, or sdclip's Hessian-aware
        clip), outside the time charged to training.
        """
        self._hessians = None
        self._calibration_start = None
        self._factors.clear()
        self._memo.clear()
        if self.config.calibration == "train":
            self.hessians(ctx)

    def pgolf_provide_calibration_batches(self, model: nn.Module, ctx: RunContext) -> list[Tensor]:
        """Training micro-batches of this rank, or text the model samples from BOS (#1019)."""
        c, r = self.config, ctx.recipe
        self._calibration_start = time.perf_counter()
        if c.calibration == "self_generated":
            seed = r.seed if c.self_gen_seed is None else c.self_gen_seed
            seqs = self_generate(model, c.self_gen_sequences, c.self_gen_seq_len, c.self_gen_temperature, seed,
                                 ctx.data.bos_id, ctx.device, c.self_gen_batch, r.train.seq_len, ctx.autocast)
            batches = list(seqs.split(c.self_gen_batch))
        else:
            batches = ctx.data.train_batches("calibration", c.calibration_batches)
        ranks = ctx.dist.world_size if c.calibration == "train" else 1  # self-generation is identical on every rank
        self._info["calibration_tokens"] = sum(b.numel() for b in batches) * ranks
        return batches

    def hessians(self, ctx: RunContext) -> Mapping[str, Tensor]:
        """The host's mean calibration Hessians of this export (collected on the first request).

        The calibration time runs from the host asking for the batches to the first time gptq sees
        the Hessians: the whole collection when gptq asks first (always, on training shards).
        """
        if self._hessians is None:
            start = time.perf_counter()
            self._hessians = ctx.services.calibration_hessians()
            began = self._calibration_start if self._calibration_start is not None else start
            self._info.update(hessians=len(self._hessians), calibration_seconds=time.perf_counter() - began)
            ctx.log(f"gptq: {len(self._hessians)} Hessians from {self._info.get('calibration_tokens', 0):,} "
                    f"{self.config.calibration} tokens in {self._info['calibration_seconds']:.1f}s")
        return self._hessians

    def pgolf_quantize_tensor(self, name: str, tensor: Tensor, spec: QuantSpec, ctx: RunContext) -> QuantizedTensor | None:
        if spec.scheme != "int" or tensor.ndim != 2:
            return None
        hessian = self.hessians(ctx).get(name)
        if hessian is None:
            self._info.setdefault("rtn_fallback", []).append(name)
            return None
        start = time.perf_counter()
        digest = spec_digest(tensor, spec)
        cached = self._memo.get(name)
        if cached is not None and cached[0] == digest:
            return cached[1]
        factor = self._factors.get(name)
        if factor is None:
            factor = self._factors[name] = factorize(hessian, self.config.damp, self.config.act_order)
        qt = gptq_quantize(tensor, factor, spec, self.config.block_size)
        self._memo[name] = (digest, qt)
        self._info["quantize_seconds"] = self._info.get("quantize_seconds", 0.0) + time.perf_counter() - start
        return qt

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        info = self._info
        return {
            "gptq_calibration": self.config.calibration,
            "gptq_calibration_tokens": info.get("calibration_tokens", 0),
            "gptq_calibration_seconds": round(info.get("calibration_seconds", 0.0), 3),
            "gptq_hessians": info.get("hessians", 0),
            "gptq_quantize_seconds": round(info.get("quantize_seconds", 0.0), 3),
            "gptq_rtn_fallback": sorted(set(info.get("rtn_fallback", []))),
        }

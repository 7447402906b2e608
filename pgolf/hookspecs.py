"""The hook contracts: what each seam of the host program (`pgolf.host`) offers a technique.

Every technique is a pluggy plugin that implements some of the hooks below. Only the host
program calls them, in this order; the host's own defaults are ordinary plugins
registered with ``trylast=True`` (`pgolf.defaults`), so a technique overrides a default by
returning a value, and the baseline is simply "no techniques enabled"::

    # configure ----------------------------------------------------------------------
    pgolf_configure(ctx)                                 # techniques adjust the recipe they run in
    errors = pgolf_contribute_config_errors(ctx)         # combinations that cannot work -> fail early
    # data ---------------------------------------------------------------------------
    transform = pgolf_provide_text_transform(ctx)        # text -> text before tokenizing (casefold)
    host: embedded corpus or shards -> tokenizer -> val tokens + per-token original bytes
    # build --------------------------------------------------------------------------
    model = pgolf_provide_model(ctx)                     # the GPT of train_gpt.py by default
    pgolf_on_model_built(model, ctx)                     # structure changes (depth recurrence)
    weights = pgolf_contribute_loss_weights(ctx)         # per-token training loss weights [vocab]
    optimizers = pgolf_provide_optimizers(model, ctx)    # Muon + Adam split by default
    reserve = sum(pgolf_contribute_train_reserve_seconds(ctx))   # taken from the wallclock cap
    host: DDP wrap, torch.compile (CUDA)
    # train --------------------------------------------------------------------------
    phases = pgolf_contribute_warmup_phases(model, ctx)  # extra graphs to warm (looping on)
    host: warmup steps for each phase, then restore the initial weights and optimizer state
    pgolf_on_train_start(model, ctx)                     # EMA shadow init
    while not host.stop():                               # wallclock cap (minus reserve) or exact steps
        pgolf_on_step_start(model, ctx)                  # frac-keyed switches (recurrence on)
        host: forward/backward/optimizer step            # compiled, no hooks inside
        pgolf_on_step_end(model, ctx)                    # EMA / SWA update
    pgolf_on_train_end(model, ctx)                       # averaging swaps in (EMA / SWA)
    host: pre-quantization eval -> checkpoint            (cache key 1)
    # export -------------------------------------------------------------------------
    pgolf_on_export_start(model, ctx)                    # calibration, charged to the training
                                                         # budget via the reserve
      ctx.services.calibration_hessians()                # on first use (gptq, sdclip), the host:
        batches = pgolf_provide_calibration_batches(model, ctx)    # gptq: training or self-generated
        w = pgolf_contribute_calibration_weights(input_ids, ctx)   # per batch: Hessian row weights
    for name, tensor in state_dict:
        spec = host default QuantSpec
        pgolf_on_quant_spec(name, tensor, spec, ctx)     # bits, clip, row split (ordered)
    pgolf_on_quant_specs(specs, state, ctx)              # choices across tensors (awq_lite)
    for name, tensor in state_dict:
        q = pgolf_quantize_tensor(name, tensor, spec, ctx)   # RTN by default, GPTQ overrides
    pgolf_on_quantized(tensors, state, ctx)              # corrections across tensors (lqer)
    host: container -> codec -> artifact; bytes = code + compressed weights   (cache key 2)
    # roundtrip ----------------------------------------------------------------------
    host: verify and decode the artifact into a fresh model (provide_model + on_model_built)
    pgolf_on_artifact_loaded(model, ctx)                 # re-activate structure (looping on)
    # eval ---------------------------------------------------------------------------
    windows = pgolf_provide_eval_windows(ctx, num_tokens)    # non-overlapping; sliding window
    scorer = pgolf_provide_scorer(ctx)                    # the frozen model; TTT scores first
    scorer(model, scores, scorer.windows_for(windows), ctx)  # per-token NLL stream (see Scorer)
    pgolf_on_scores(scores, ctx)                          # PPM mixing, ordered
    host: BPB from true bytes, validity audits           (cache key 3)
    # report -------------------------------------------------------------------------
    metrics = pgolf_contribute_metrics(ctx)

Naming carries the contract: ``pgolf_provide_*`` returns the one object (firstresult; two
enabled techniques providing the same object is an error caught before the run),
``pgolf_contribute_*`` returns items that are collected, ``pgolf_on_*`` notifies and may mutate
what it is given, in the order the registry resolved; ``pgolf_quantize_tensor`` is the one
firstresult hook outside ``provide_*`` (the first technique that quantizes a tensor wins, and
returning None passes it on). No hook runs inside compiled forward/backward code: a technique
that changes the math does so at build time.

Each spec carries the stage whose output it changes (`HOOK_STAGES`): ``configure`` and
``report`` hooks change no stage output. The registry uses the tags twice: a technique must not
implement a non-``contribute`` hook of a stage earlier than the one it declares (an ablation would
reuse outputs made without it), and a technique has acted in a run only if a hook of its declared
stage or a later one fired, or its ``pgolf_configure`` changed the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import pluggy
import torch
from torch import nn

from pgolf.api import (
    PROJECT,
    EvalWindows,
    QuantizedTensor,
    QuantSpec,
    RunContext,
    Scorer,
    TextTransform,
    TokenScores,
    WarmupPhase,
)

HookStage = Literal["configure", "train", "export", "eval", "report"]
_marker = pluggy.HookspecMarker(PROJECT)
HOOK_STAGES: dict[str, HookStage] = {}


def hookspec(stage: HookStage, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a hook and the stage whose output it changes."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        HOOK_STAGES[fn.__name__] = stage
        return _marker(**options)(fn)

    return mark


# --- configure ---------------------------------------------------------------------------


@hookspec("configure")
def pgolf_configure(ctx: RunContext) -> None:
    """Adjust the recipe before anything is built.

    Runs first, in resolved technique order. A technique may set model, training or export
    options from its own config (for example XSA sets ``ctx.recipe.model.xsa_last_n``); a
    configure that changes the recipe counts as the technique having acted. Afterwards the recipe
    is frozen: the cache keys are computed from it, so no later hook may change it.

    Used by: the architecture and optimizer techniques (leaky_relu, xsa, partial_rope,
    parallel_residuals, smear_gate, muon_wd, muon_eq_r), codec.
    """


@hookspec("configure")
def pgolf_contribute_config_errors(ctx: RunContext) -> list[str] | None:
    """Return problems with the configured run that declarative conflicts cannot express.

    Each string is one complete sentence; the run stops before data or training if any is
    returned. Used by: casefold (needs a byte sidecar), gptq (needs a budget reserve on
    wallclock runs), sdclip and freq_weighting (modes that need gptq), ttt.
    """


# --- data --------------------------------------------------------------------------------


@hookspec("train", firstresult=True)
def pgolf_provide_text_transform(ctx: RunContext) -> TextTransform | None:
    """Return a text transform applied to every document before tokenizing.

    The host trains the tokenizer on transformed text and records, for every validation
    token, the number of *original* UTF-8 bytes it covers (the byte sidecar), so BPB stays
    charged on the original bytes. Used by: casefold.
    """


# --- build -------------------------------------------------------------------------------


@hookspec("train", firstresult=True)
def pgolf_provide_model(ctx: RunContext) -> nn.Module | None:
    """Return a freshly initialised model (the host default is the challenge's GPT).

    Called again when an artifact is decoded, so it must depend only on the recipe.
    """


@hookspec("train")
def pgolf_on_model_built(model: nn.Module, ctx: RunContext) -> None:
    """Change the model's structure in place before optimizers and compilation.

    Runs in resolved order; also runs when an artifact is decoded, so the structure is
    re-applied before the weights load. Used by: recurrence.
    """


@hookspec("train")
def pgolf_contribute_loss_weights(ctx: RunContext) -> torch.Tensor | None:
    """Return per-token training loss weights of shape [vocab_size] (multiplied together).

    The host folds them into the compiled loss as ``sum(w[y] * ce) / sum(w[y])``; evaluation
    always stays unweighted. Used by: freq_weighting (mode: loss).
    """


@hookspec("train", firstresult=True)
def pgolf_provide_optimizers(model: nn.Module, ctx: RunContext) -> list[Any] | None:
    """Return the optimizers (host default: Muon for block matrices, Adam for the rest).

    Every param group must carry ``base_lr``; the host scales it by the warmdown multiplier.
    """


@hookspec("train")
def pgolf_contribute_train_reserve_seconds(ctx: RunContext) -> float | None:
    """Return seconds to take off the training wallclock for work charged to training time.

    Used by: gptq (Hessian calibration on training shards must finish inside the 600 s),
    freq_weighting (token counts on training shards at export).
    """


# --- train -------------------------------------------------------------------------------


@hookspec("train")
def pgolf_contribute_warmup_phases(model: nn.Module, ctx: RunContext) -> list[WarmupPhase] | None:
    """Return extra warmup phases so every graph variant is compiled before timing starts.

    The host runs its warmup steps once plainly and once inside each phase, then restores the
    initial weights and optimizer state. Used by: recurrence (the looped graph).
    """


@hookspec("train")
def pgolf_on_train_start(model: nn.Module, ctx: RunContext) -> None:
    """Training is about to start (after warmup and restore). Used by: ema (shadow init)."""


@hookspec("train")
def pgolf_on_step_start(model: nn.Module, ctx: RunContext) -> None:
    """Before each training step; ``ctx.clock.step`` and ``ctx.clock.frac`` (elapsed fraction) are set.

    The step then runs with ``ctx.clock.lr_scale`` (the warmdown multiplier, which a hook may scale) and
    ``ctx.clock.seq_len`` (0 = ``train.seq_len``; a hook may set it; batch_tokens stays fixed).
    Used by: recurrence (turns looping on at a fraction of the wallclock), progressive_context (the
    sequence-length stage and its LR re-warmup).
    """


@hookspec("train")
def pgolf_on_step_end(model: nn.Module, ctx: RunContext) -> None:
    """After each optimizer step; ``ctx.clock.lr_scale`` holds the warmdown multiplier used.

    Used by: ema (EMA / SWA update).
    """


@hookspec("train")
def pgolf_on_train_end(model: nn.Module, ctx: RunContext) -> None:
    """Training finished: swap averaged weights into ``model`` before the checkpoint is saved.

    Everything after this (pre-quantization eval, calibration, quantization) sees the
    averaged weights. Time spent here is charged to training. Used by: ema.
    """


# --- export ------------------------------------------------------------------------------


@hookspec("export")
def pgolf_on_export_start(model: nn.Module, ctx: RunContext) -> None:
    """Collect calibration statistics from the trained (averaged) weights before quantizing.

    Reading training shards here is legal only inside the training budget: the host charges
    this hook's time to training, and techniques that use it declare a reserve with
    ``pgolf_contribute_train_reserve_seconds``. Validation data is never reachable from here.
    Used by: gptq, freq_weighting (counts on training shards), sdclip (mode: target keeps the
    state it searches over).
    """


@hookspec("export")
def pgolf_contribute_calibration_weights(input_ids: torch.Tensor, ctx: RunContext) -> torch.Tensor | None:
    """Return per-position weights, shaped like ``input_ids`` [batch, seq], for one calibration batch.

    Called by the host while it collects the calibration Hessians (`ctx.services`), once per
    calibration batch: every input row X_t of every quantized layer enters ``H += w_t * X_t^T X_t``,
    so a weight of 2 counts that position twice. Contributions are multiplied together.
    Used by: freq_weighting (mode: hessian).
    """


@hookspec("export", firstresult=True)
def pgolf_provide_calibration_batches(model: nn.Module, ctx: RunContext) -> list[torch.Tensor] | None:
    """Return the input-id batches [batch, seq] the calibration Hessians are collected on.

    Called by the host once per export, the first time a technique asks for
    ``ctx.services.calibration_hessians()``. Training data read here (``ctx.data.train_batches``)
    is legal only inside the training budget: call for the Hessians in ``pgolf_on_export_start``,
    which the host charges to training, and declare a reserve. With no provider, asking for the
    Hessians is an error. Used by: gptq (training shards, or text the model generates itself).
    """


@hookspec("export")
def pgolf_on_quant_spec(name: str, tensor: torch.Tensor, spec: QuantSpec, ctx: RunContext) -> None:
    """Adjust one tensor's quantization spec in place (bits, clip, row groups).

    Runs in resolved order whatever the recipe's order. Used by: sandwich_quant (bits by
    position), sdclip (std-based clip), freq_weighting (mode: embed_quant).
    """


@hookspec("export")
def pgolf_on_quant_specs(specs: dict[str, QuantSpec], state: dict[str, torch.Tensor], ctx: RunContext) -> None:
    """See every tensor's spec (after `pgolf_on_quant_spec`) before any is quantized; edit them in place.

    For choices ranked across tensors. Used by: awq_lite (the globally most salient column groups).
    """


@hookspec("export", firstresult=True)
def pgolf_quantize_tensor(name: str, tensor: torch.Tensor, spec: QuantSpec, ctx: RunContext) -> QuantizedTensor | None:
    """Quantize one tensor by its spec (host default: round to nearest). Used by: gptq."""


@hookspec("export")
def pgolf_on_quantized(tensors: dict[str, QuantizedTensor], state: dict[str, torch.Tensor], ctx: RunContext) -> None:
    """Every tensor is quantized (`state` holds the weights they came from); replace entries of `tensors`.

    For corrections ranked across tensors. Used by: lqer (low-rank error factors on the top-K tensors).
    """


# --- roundtrip ---------------------------------------------------------------------------


@hookspec("eval")
def pgolf_on_artifact_loaded(model: nn.Module, ctx: RunContext) -> None:
    """Trained weights were loaded into a fresh ``model``; re-activate what a state dict does not hold.

    Called on a decoded artifact before evaluation, and, for train-stage techniques only, on a
    stored checkpoint before it is exported (an ablation's cached checkpoint, or a raw
    ``final_model.pt`` that `pgolf eval` exports first): the model must then be as training left
    it. Used by: recurrence (looping is always on after training).
    """


# --- eval --------------------------------------------------------------------------------


@hookspec("eval", firstresult=True)
def pgolf_provide_eval_windows(ctx: RunContext, num_tokens: int) -> EvalWindows | None:
    """Return the windows that score the validation stream (each target exactly once).

    Host default: the challenge's non-overlapping windows. Used by: sliding_window.
    """


@hookspec("eval", firstresult=True)
def pgolf_provide_scorer(ctx: RunContext) -> Scorer | None:
    """Return the scorer that turns (model, validation data, windows) into per-token NLL.

    Host default: score every window with the frozen model. A scorer has duties the audits check
    (probes at ``scores.probe_at``, a tick per scoring, ``record_update`` before every adaptation
    step, this rank's share only, ``windows_for`` when it scores other windows): see
    `pgolf.api.Scorer`. Used by: ttt (score a chunk completely, then adapt on it).
    """


@hookspec("eval")
def pgolf_on_scores(scores: TokenScores, ctx: RunContext) -> None:
    """Transform the per-token NLL stream in place (and its audit probes), in resolved order.

    A transform must keep a full normalized distribution at every position and use only
    already-scored tokens; the normalization and causality audits check both. Used by: ppm.
    """


# --- report ------------------------------------------------------------------------------


@hookspec("report")
def pgolf_contribute_metrics(ctx: RunContext) -> dict[str, Any] | None:
    """Return extra metrics for result.json (collected). Used by: ttt, ppm, gptq, sdclip."""

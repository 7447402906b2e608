"""The pgolf lifecycle: one linear host program, with pluggy hooks at its seams.

Every technique is a pluggy plugin that implements some of the hooks below. The host
(`pgolf.lifecycle`) calls them in this order; the host's own defaults are ordinary plugins
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
    pgolf_on_export_start(model, ctx)                    # calibration (GPTQ Hessians), charged to
                                                         # the training budget via the reserve
        w = pgolf_contribute_calibration_weights(input_ids, ctx)   # called by gptq per batch:
                                                         # per-position Hessian row weights
    for name, tensor in state_dict:
        spec = host default QuantSpec
        pgolf_on_quant_spec(name, tensor, spec, ctx)     # bits, clip, row split (ordered)
        q = pgolf_quantize_tensor(name, tensor, spec, ctx)   # RTN by default, GPTQ overrides
    host: container -> codec -> artifact; bytes = code + compressed weights   (cache key 2)
    # roundtrip ----------------------------------------------------------------------
    host: decode the artifact into a fresh model (pgolf_provide_model + pgolf_on_model_built)
    pgolf_on_artifact_loaded(model, ctx)                 # re-activate structure (looping on)
    # eval ---------------------------------------------------------------------------
    windows = pgolf_provide_eval_windows(ctx, num_tokens)    # non-overlapping; sliding window
    scores = pgolf_provide_scorer(ctx)(model, val, windows)  # per-token NLL stream; TTT scores first
    pgolf_on_scores(scores, ctx)                          # PPM mixing, ordered
    host: BPB from true bytes, validity audits           (cache key 3)
    # report -------------------------------------------------------------------------
    metrics = pgolf_contribute_metrics(ctx)
    pgolf_on_run_end(ctx, result)

Naming carries the contract: ``pgolf_provide_*`` returns the one object (firstresult; two
enabled techniques providing the same object is an error caught before the run),
``pgolf_contribute_*`` returns items that are collected, ``pgolf_on_*`` notifies and may mutate
what it is given, in the order the registry resolved. No hook runs inside compiled
forward/backward code: a technique that changes the math does so at build time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pgolf.context import RunContext
    from pgolf.evaluate import EvalWindows, Scorer, TokenScores
    from pgolf.quant import QuantizedTensor, QuantSpec
    from pgolf.textdata import TextTransform
    from pgolf.train import WarmupPhase

PROJECT = "pgolf"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- configure ---------------------------------------------------------------------------


@hookspec
def pgolf_configure(ctx: RunContext) -> None:
    """Adjust the recipe before anything is built.

    Runs first, in resolved technique order. A technique may set model, training or export
    options from its own config (for example XSA sets ``ctx.recipe.model.xsa_last_n``).

    Used by: the architecture and optimizer techniques (leaky_relu, xsa, partial_rope,
    parallel_residuals, smear_gate, muon_wd, muon_eq_r), codec.
    """


@hookspec
def pgolf_contribute_config_errors(ctx: RunContext) -> list[str] | None:
    """Return problems with the configured run that declarative conflicts cannot express.

    Each string is one complete sentence; the run stops before data or training if any is
    returned. Used by: casefold (needs a byte sidecar), gptq (needs a budget reserve on
    wallclock runs), sdclip and freq_weighting (modes that need gptq), ttt.
    """


# --- data --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pgolf_provide_text_transform(ctx: RunContext) -> TextTransform | None:
    """Return a text transform applied to every document before tokenizing.

    The host trains the tokenizer on transformed text and records, for every validation
    token, the number of *original* UTF-8 bytes it covers (the byte sidecar), so BPB stays
    charged on the original bytes. Used by: casefold.
    """


# --- build -------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pgolf_provide_model(ctx: RunContext) -> nn.Module | None:
    """Return a freshly initialised model (the host default is the challenge's GPT).

    Called again when an artifact is decoded, so it must depend only on the recipe.
    """


@hookspec
def pgolf_on_model_built(model: nn.Module, ctx: RunContext) -> None:
    """Change the model's structure in place before optimizers and compilation.

    Runs in resolved order; also runs when an artifact is decoded, so the structure is
    re-applied before the weights load. Used by: recurrence.
    """


@hookspec
def pgolf_contribute_loss_weights(ctx: RunContext) -> torch.Tensor | None:
    """Return per-token training loss weights of shape [vocab_size] (multiplied together).

    The host folds them into the compiled loss as ``sum(w[y] * ce) / sum(w[y])``; evaluation
    always stays unweighted. Used by: freq_weighting (mode: loss).
    """


@hookspec(firstresult=True)
def pgolf_provide_optimizers(model: nn.Module, ctx: RunContext) -> list[Any] | None:
    """Return the optimizers (host default: Muon for block matrices, Adam for the rest).

    Every param group must carry ``base_lr``; the host scales it by the warmdown multiplier.
    """


@hookspec
def pgolf_contribute_train_reserve_seconds(ctx: RunContext) -> float | None:
    """Return seconds to take off the training wallclock for work charged to training time.

    Used by: gptq (Hessian calibration on training shards must finish inside the 600 s),
    freq_weighting (token counts on training shards at export).
    """


# --- train -------------------------------------------------------------------------------


@hookspec
def pgolf_contribute_warmup_phases(model: nn.Module, ctx: RunContext) -> list[WarmupPhase] | None:
    """Return extra warmup phases so every graph variant is compiled before timing starts.

    The host runs its warmup steps once plainly and once inside each phase, then restores the
    initial weights and optimizer state. Used by: recurrence (the looped graph).
    """


@hookspec
def pgolf_on_train_start(model: nn.Module, ctx: RunContext) -> None:
    """Training is about to start (after warmup and restore). Used by: ema (shadow init)."""


@hookspec
def pgolf_on_step_start(model: nn.Module, ctx: RunContext) -> None:
    """Before each training step; ``ctx.step`` and ``ctx.frac`` (elapsed fraction) are set.

    Used by: recurrence (turns looping on at a fraction of the wallclock).
    """


@hookspec
def pgolf_on_step_end(model: nn.Module, ctx: RunContext) -> None:
    """After each optimizer step; ``ctx.lr_scale`` holds the warmdown multiplier used.

    Used by: ema (EMA / SWA update).
    """


@hookspec
def pgolf_on_train_end(model: nn.Module, ctx: RunContext) -> None:
    """Training finished: swap averaged weights into ``model`` before the checkpoint is saved.

    Everything after this (pre-quantization eval, calibration, quantization) sees the
    averaged weights. Time spent here is charged to training. Used by: ema.
    """


# --- export ------------------------------------------------------------------------------


@hookspec
def pgolf_on_export_start(model: nn.Module, ctx: RunContext) -> None:
    """Collect calibration statistics from the trained (averaged) weights before quantizing.

    Reading training shards here is legal only inside the training budget: the host charges
    this hook's time to training, and techniques that use it declare a reserve with
    ``pgolf_contribute_train_reserve_seconds``. Validation data is never reachable from here.
    Used by: gptq, freq_weighting (counts on training shards), sdclip (mode: target keeps the
    state it searches over).
    """


@hookspec
def pgolf_contribute_calibration_weights(input_ids: torch.Tensor, ctx: RunContext) -> torch.Tensor | None:
    """Return per-position weights, shaped like ``input_ids`` [batch, seq], for one calibration batch.

    Called by the technique that collects GPTQ Hessians (not by the host), once per calibration
    batch: every input row X_t of every quantized layer enters ``H += w_t * X_t^T X_t``, so a
    weight of 2 counts that position twice. Contributions are multiplied together.
    Called by: gptq. Used by: freq_weighting (mode: hessian).
    """


@hookspec
def pgolf_on_quant_spec(name: str, tensor: torch.Tensor, spec: QuantSpec, ctx: RunContext) -> None:
    """Adjust one tensor's quantization spec in place (bits, clip, row groups).

    Runs in resolved order whatever the recipe's order. Used by: sandwich_quant (bits by
    position), sdclip (std-based clip), freq_weighting (mode: embed_quant).
    """


@hookspec(firstresult=True)
def pgolf_quantize_tensor(name: str, tensor: torch.Tensor, spec: QuantSpec, ctx: RunContext) -> QuantizedTensor | None:
    """Quantize one tensor by its spec (host default: round to nearest). Used by: gptq."""


# --- roundtrip ---------------------------------------------------------------------------


@hookspec
def pgolf_on_artifact_loaded(model: nn.Module, ctx: RunContext) -> None:
    """The artifact was decoded into ``model``; re-activate eval-time structure.

    Also called, for train-stage techniques only, when the ablation runner loads a cached
    checkpoint before export: the model must then be as training left it. Used by: recurrence
    (looping is always on at evaluation).
    """


# --- eval --------------------------------------------------------------------------------


@hookspec(firstresult=True)
def pgolf_provide_eval_windows(ctx: RunContext, num_tokens: int) -> EvalWindows | None:
    """Return the windows that score the validation stream (each target exactly once).

    Host default: the challenge's non-overlapping windows. Used by: sliding_window.
    """


@hookspec(firstresult=True)
def pgolf_provide_scorer(ctx: RunContext) -> Scorer | None:
    """Return the scorer that turns (model, validation data, windows) into per-token NLL.

    Host default: score every window with the frozen model. Used by: ttt (score a chunk
    completely, then adapt on it, recording every update for the score-before-update audit).
    """


@hookspec
def pgolf_on_scores(scores: TokenScores, ctx: RunContext) -> None:
    """Transform the per-token NLL stream in place (and its audit probes), in resolved order.

    A transform must keep a full normalized distribution at every position and use only
    already-scored tokens; the normalization and causality audits check both. Used by: ppm.
    """


# --- report ------------------------------------------------------------------------------


@hookspec
def pgolf_contribute_metrics(ctx: RunContext) -> dict[str, Any] | None:
    """Return extra metrics for result.json (collected). Used by: ttt, ppm, gptq, sdclip."""


@hookspec
def pgolf_on_run_end(ctx: RunContext, result: dict[str, Any]) -> None:
    """The run's result is final; observers may read it (writers, loggers)."""

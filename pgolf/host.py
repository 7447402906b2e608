"""The host program: configure -> data -> train -> export -> eval -> report. Read this first.

One linear program, in the spirit of the challenge's train_gpt.py: `run` at the top calls the
stages in order, and each stage is a function over typed products (`pgolf.products`):

    session    = Session(recipe)                  configure: techniques adjust and check the recipe
    load_data(session)                            data: shards or embedded corpus, byte accounting
    checkpoint = train_stage(session)             build, warmup, timed loop, averaging  (cache key 1)
    artifact   = export_stage(session, checkpoint)   calibrate, quantize, compress       (cache key 2)
    scored     = eval_stage(session, artifact, checkpoint.info)   round trip, score, audit (key 3)

`pgolf run`, `pgolf eval` and `pgolf ablate` call these same functions (an ablation runs each
stage as a job from the stored product of the one before), so the lifecycle is written once.
This is the only module that calls hooks: each call sits at its seam below, and the contracts
are in `pgolf.hookspecs`. Techniques see only `pgolf.api`.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import inspect
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import pgolf
from pgolf import compliance
from pgolf.artifact import encode_export, pack
from pgolf.bundle import code_bytes
from pgolf.calibration import collect_hessians
from pgolf.config import Provenance, freeze, thawed_copy
from pgolf.context import DataView, Distributed, MetricsLog, RunContext
from pgolf.data.dataset import DataLedger, Dataset, DistributedTokenLoader, load_dataset
from pgolf.data.shards import read_shard
from pgolf.defaults import HostDefaults
from pgolf.errors import ConfigError, DataError, RegistryError, raise_collected
from pgolf.loop import LoopHooks, grad_accum_steps, train
from pgolf.model import prepare_for_device
from pgolf.products import Artifact, Checkpoint, Scored
from pgolf.quant import QuantizedTensor, default_spec, dequantize
from pgolf.recipe import Recipe, recipe_from_dict, recipe_summary_yaml
from pgolf.registry import Trace, build_plugin_manager, check_declared_stages, resolve, silent_techniques
from pgolf.reporter import Reporter
from pgolf.runtime import (
    environment,
    init_distributed,
    module_version,
    pick_device,
    seed_everything,
    state_checksum,
    sync,
)
from pgolf.scores import TokenScores, WindowScorer, limit_tokens, plain_windows

if TYPE_CHECKING:
    from pgolf.tracking import Tracking


def run(recipe: Recipe, out_dir: Path, reporter: Reporter | None = None, device: str | None = None,
        tracking: Tracking | None = None) -> dict[str, Any]:
    """`pgolf run`: every stage in order, the run directory written; returns result.json's content.
    With `tracking` (main rank), each training metrics line also goes to its trackers as it is written."""
    distributed = init_distributed()
    main = distributed.is_main
    reporter = reporter or Reporter(quiet=not main)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("log.txt", "metrics.jsonl"):
            (out_dir / stale).unlink(missing_ok=True)
        reporter.log_path = out_dir / "log.txt"
    session = Session(recipe, reporter=reporter, metrics_dir=out_dir if main else None, distributed=distributed,
                      device=pick_device(distributed, device))
    if main and tracking is not None:
        session.ctx.metrics = tracking.metrics_log(session.ctx.metrics)
    if main:
        (out_dir / "config.yaml").write_text(recipe_summary_yaml(recipe), encoding="utf-8")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    load_data(session)
    seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint = train_stage(session)
    seconds["train"] = time.perf_counter() - t
    if main:
        checkpoint.write(out_dir)
    t = time.perf_counter()
    artifact = export_stage(session, checkpoint)
    seconds["export"] = time.perf_counter() - t
    if main:
        artifact.write(out_dir)
    try:
        scored = eval_stage(session, artifact, checkpoint.info, seconds)
    except SilentTechniques as exc:
        if main:
            exc.scored.write(out_dir)
        raise
    if main:
        scored.write(out_dir)
    if distributed.enabled:
        dist.barrier()
    return scored.result


# --- configure --------------------------------------------------------------------------------


class Session:
    """One recipe in one process: resolved techniques, the traced plugin manager, the run context.

    Building it is the configure stage: techniques adjust the recipe (``pgolf_configure``) and
    report what cannot work (``pgolf_contribute_config_errors``, all at once); then the recipe is
    frozen, so nothing later can change what the cache keys were computed from.
    """

    def __init__(self, recipe: Recipe, *, reporter: Reporter | None = None, metrics_dir: Path | None = None,
                 distributed: Distributed | None = None, device: torch.device | None = None) -> None:
        recipe = thawed_copy(recipe)  # the session's own: techniques configure it, then it is frozen
        self.recipe = recipe
        self.recipe_dict = recipe.to_dict()  # as written, before techniques configure it
        self.reporter = reporter or Reporter()
        self.dist = distributed or Distributed()
        self.device = device or pick_device(self.dist)
        self.enabled = resolve(recipe.techniques, recipe.provenance)
        check_declared_stages(self.enabled, recipe.provenance)
        self.trace = Trace()
        self.produced = Trace()  # the stage traces this session made itself (already in `trace`)
        self.pm = build_plugin_manager(self.enabled, HostDefaults(), self.trace)
        self.hook = self.pm.hook
        metrics = MetricsLog(metrics_dir / "metrics.jsonl" if metrics_dir is not None else None)
        self.services = Services(self)
        self.ctx = RunContext(recipe=recipe, device=self.device, dist=self.dist, log=self.reporter.log,
                              metrics=metrics, services=self.services)
        self.dataset: Dataset | None = None
        self.data_seconds = 0.0
        self.hook.pgolf_configure(ctx=self.ctx)
        freeze(recipe)  # from here on the recipe is what the cache keys are computed from
        problems = [p for batch in self.hook.pgolf_contribute_config_errors(ctx=self.ctx) for p in (batch or [])]
        raise_collected([ConfigError(p, file=recipe.provenance.default_file, key="techniques") for p in problems])

    @property
    def data(self) -> Dataset:
        if self.dataset is None:
            raise RuntimeError("the data stage has not run yet")
        return self.dataset


def session_from_artifact(meta: Mapping[str, Any], extra_techniques: Mapping[str, Any] | None = None,
                          **kwargs: Any) -> Session:
    """A session for the recipe an artifact was made with (plus eval-time techniques)."""
    data = copy.deepcopy(dict(meta["recipe"]))
    if extra_techniques:
        data["techniques"] = {**(data.get("techniques") or {}), **extra_techniques}
    return Session(recipe_from_dict(data, Provenance(default_file="artifact")), **kwargs)


# --- data ---------------------------------------------------------------------------------------


def load_data(session: Session) -> Dataset:
    """Shards or the embedded corpus, through the text transform a technique provides."""
    r = session.recipe
    start = time.perf_counter()
    dataset = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size, text_transform(session),
                           r.data.train_shards)
    attach_data(session, dataset)
    session.data_seconds = time.perf_counter() - start
    session.reporter.log(f"data: {dataset.source} {dataset.dir} train_shards:{len(dataset.train_files)} "
                         f"val_tokens:{dataset.val_tokens.size} val_bytes:{int(dataset.val_bytes.sum())} "
                         f"byte_source:{dataset.byte_source}")
    return dataset


def text_transform(session: Session) -> Any:
    """The text transform a technique provides (casefold), or None: it decides which data is loaded."""
    return session.hook.pgolf_provide_text_transform(ctx=session.ctx)


def attach_data(session: Session, dataset: Dataset) -> None:
    """Give the session its dataset, and techniques their read-only view of the training side."""
    session.dataset = dataset
    session.ctx.data = DataView(dataset.bos_id, dataset.vocab_size, dataset,
                                batches=lambda purpose, count: training_batches(session, purpose, count))


def training_batches(session: Session, purpose: str, count: int) -> list[Tensor]:
    """The first `count` input batches of this rank's training stream, as the loop reads them."""
    r, ctx = session.recipe, session.ctx
    loader = DistributedTokenLoader(session.data.train_stream(purpose), ctx.dist.rank, ctx.dist.world_size, ctx.device)
    accum = grad_accum_steps(r.train, ctx.dist.world_size)
    return [loader.next_batch(r.train.batch_tokens, r.train.seq_len, accum)[0] for _ in range(count)]


# --- train --------------------------------------------------------------------------------------


def new_model(session: Session) -> nn.Module:
    """A freshly initialised model with every structure-changing technique applied."""
    model = session.hook.pgolf_provide_model(ctx=session.ctx)
    session.hook.pgolf_on_model_built(model=model, ctx=session.ctx)
    return prepare_for_device(model, session.device)


def train_stage(session: Session) -> Checkpoint:
    r, ctx, hook = session.recipe, session.ctx, session.hook
    session.reporter.stage("train")
    mark = session.trace.to_dict()
    seed_everything(r.seed)
    model = new_model(session)
    weights = [w for w in hook.pgolf_contribute_loss_weights(ctx=ctx) if w is not None]
    if weights:  # training alone reads them: evaluation stays unweighted
        model.loss_weights = torch.stack([w.float().cpu() for w in weights]).prod(0).to(session.device)
    optimizers = hook.pgolf_provide_optimizers(model=model, ctx=ctx)
    ctx.clock.reserve_seconds = train_reserve_seconds(session)
    params = sum(p.numel() for p in model.parameters())
    session.reporter.log(f"model_params:{params} device:{session.device} world_size:{session.dist.world_size} "
                         f"reserve:{ctx.clock.reserve_seconds:.1f}s")
    result = train(model, compile_and_wrap(session, model), optimizers, session.data, ctx, loop_hooks(session),
                   progress=session.reporter.progress)
    session.reporter.done()
    start = time.perf_counter()
    hook.pgolf_on_train_end(model=model, ctx=ctx)  # averaged weights swap in
    averaging = time.perf_counter() - start
    session.reporter.log(f"stopped at step {result.steps} after {result.train_seconds:.1f}s "
                         f"({result.step_avg_ms:.1f} ms/step){' (wallclock cap)' if result.stopped_early else ''}")
    pre = score_plain(session, model)
    info = {
        "steps": result.steps, "train_seconds": result.train_seconds, "averaging_seconds": averaging,
        "warmup_seconds": result.warmup_seconds, "stopped_early": result.stopped_early,
        "final_train_loss": result.final_train_loss, "tokens_seen": result.tokens_seen,
        "step_avg_ms": result.step_avg_ms, "wallclock_cap_seconds": result.wallclock_cap_seconds,
        "reserve_seconds": result.reserve_seconds, "model_params": params, **pre,
    }
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    trace = stage_trace(session, mark)
    return Checkpoint(state, info, trace, copy.deepcopy(session.data.ledger.reads))


def loop_hooks(session: Session) -> LoopHooks:
    """The hook calls at the training loop's seams (the loop itself never calls hooks)."""
    hook, ctx = session.hook, session.ctx
    return LoopHooks(
        warmup_phases=lambda m: [p for batch in hook.pgolf_contribute_warmup_phases(model=m, ctx=ctx) for p in batch or []],
        train_start=lambda m: hook.pgolf_on_train_start(model=m, ctx=ctx),
        step_start=lambda m: hook.pgolf_on_step_start(model=m, ctx=ctx),
        step_end=lambda m: hook.pgolf_on_step_end(model=m, ctx=ctx),
    )


def train_reserve_seconds(session: Session) -> float:
    """Seconds techniques take off the wallclock cap for work charged to training (calibration)."""
    return float(sum(x for x in session.hook.pgolf_contribute_train_reserve_seconds(ctx=session.ctx) if x))


def compile_and_wrap(session: Session, model: nn.Module) -> nn.Module:
    setting = session.recipe.train.compile
    wrapped = model
    if setting == "on" or (setting == "auto" and session.device.type == "cuda"):
        wrapped = torch.compile(model, dynamic=False, fullgraph=True)
    if session.dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [session.dist.local_rank] if session.device.type == "cuda" else None
        # Buffers (rotary tables) are identical on every rank: never re-broadcast them per forward.
        # Newer torch spells this forward_sync_buffers and warns on the old broadcast_buffers.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        wrapped = DDP(wrapped, device_ids=ids, **no_sync)
    return wrapped


def score_plain(session: Session, model: nn.Module) -> dict[str, float]:
    """The challenge's eval_val on the model as it is (no eval-stage techniques): pre-quantization."""
    tokens, counts = limit_tokens(session.data.val_tokens, session.data.val_bytes, session.recipe.eval.max_tokens)
    loss, bpb = evaluate_stream(session, model, tokens, counts, techniques=False).loss_and_bpb()
    session.reporter.log(f"pre-quantization val_loss:{loss:.6f} val_bpb:{bpb:.6f}")
    return {"val_loss_prequant": loss, "val_bpb_prequant": bpb}


def checkpoint_from_state(session: Session, state: dict[str, Tensor]) -> Checkpoint:
    """A checkpoint from weights trained elsewhere (a challenge final_model.pt): scored as saved."""
    model = model_from_checkpoint(session, Checkpoint(state, {}))
    info = {"train_seconds": 0.0, "steps": 0, "step_avg_ms": 0.0, "tokens_seen": 0, **score_plain(session, model)}
    return Checkpoint(state, info)


# --- export -------------------------------------------------------------------------------------


def model_with(session: Session, state: Mapping[str, Tensor]) -> nn.Module:
    """A fresh model (already on the device, in its dtypes) holding `state`."""
    model = new_model(session)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise DataError(f"the weights do not match the recipe's model: missing {sorted(missing)[:5]}, unexpected "
                        f"{sorted(unexpected)[:5]}", hint="Pass the --recipe (and --set overrides) it was trained with.")
    model.load_state_dict(dict(state), strict=True)  # copies into the model's own dtypes (a bf16 state included)
    return model


def model_from_checkpoint(session: Session, checkpoint: Checkpoint) -> nn.Module:
    """The trained model as the train stage left it: the weights, plus what train-stage techniques
    re-activate that a state dict does not hold (recurrence turns looping on)."""
    model = model_with(session, checkpoint.state)
    later = [e.instance for e in session.enabled if e.stage != "train"]
    session.pm.subset_hook_caller("pgolf_on_artifact_loaded", remove_plugins=later)(model=model, ctx=session.ctx)
    session.ctx.clock.step = int(checkpoint.info.get("steps", 0))
    session.ctx.clock.reserve_seconds = float(checkpoint.info.get("reserve_seconds", 0.0))
    return model


def export_stage(session: Session, checkpoint: Checkpoint) -> Artifact:
    r, ctx = session.recipe, session.ctx
    session.reporter.stage("export")
    mark = session.trace.to_dict()
    model = model_from_checkpoint(session, checkpoint)
    session.services.begin_export(model)
    start = time.perf_counter()
    session.hook.pgolf_on_export_start(model=model, ctx=ctx)  # calibration: charged to training
    calibration = time.perf_counter() - start
    start = time.perf_counter()
    tensors, notes, bits = quantize_state(session, model.state_dict())
    trace = Trace()
    for part in (checkpoint.trace, stage_trace(session, mark)):
        trace.merge(part)
    meta = {"pgolf_version": pgolf.__version__, "recipe": session.recipe_dict, "bos_id": ctx.data.bos_id,
            "train": checkpoint.info, "calibration_seconds": calibration, "trace": trace.to_dict()}
    payload = pack(tensors, meta)
    blob = encode_export(payload, r.export)
    info = {**bytes_info(session, blob, checkpoint.info.get("steps")), "bytes_payload": len(payload),
            "calibration_seconds": calibration, "quantize_seconds": time.perf_counter() - start, "quant_notes": notes, "bits": bits}
    session.services.end_export()
    session.reporter.log(f"artifact: model {info['bytes_model']:,} + code {info['bytes_code']:,} = "
                         f"{info['bytes_total']:,} bytes (budget {r.export.budget_bytes:,})")
    ledger = DataLedger(copy.deepcopy(checkpoint.ledger))
    ledger.merge(session.data.ledger.reads)
    return Artifact(blob, info, meta["trace"], ledger.reads)


def quantize_state(session: Session, state: Mapping[str, Tensor]
                   ) -> tuple[dict[str, QuantizedTensor], dict[str, list[str]], dict[str, int]]:
    """Every tensor through the spec hooks and the quantizer, as the artifact stores it."""
    hook, ctx = session.hook, session.ctx
    cpu = {name: tensor.detach().to("cpu") for name, tensor in state.items()}
    specs, tensors, notes, bits = {}, {}, {}, {}
    for name, t in cpu.items():
        specs[name] = spec = default_spec(name, t, session.recipe.export)
        hook.pgolf_on_quant_spec(name=name, tensor=t, spec=spec, ctx=ctx)
    hook.pgolf_on_quant_specs(specs=specs, state=cpu, ctx=ctx)
    for name, t in cpu.items():
        tensors[name] = hook.pgolf_quantize_tensor(name=name, tensor=t, spec=specs[name], ctx=ctx)
    hook.pgolf_on_quantized(tensors=tensors, state=cpu, ctx=ctx)
    for name, spec in specs.items():
        if spec.notes:
            notes[name] = spec.notes
        bits[name] = spec.bits if spec.scheme == "int" else {"fp16": 16, "fp32": 32, "raw": 0}[spec.scheme]
    return tensors, notes, bits


def bytes_info(session: Session, blob: bytes, steps: int | None = None) -> dict[str, Any]:
    """Artifact bytes = compressed model + the code this run ships: the train_gpt.py `pgolf export`
    writes for this recipe, step-matched to the `steps` trained (`pgolf.bundle`)."""
    export = session.recipe.export
    code = code_bytes(session.recipe_dict, steps)
    counted = code.compressed if export.code_bytes == "compressed" else code.raw
    return {"bytes_model": len(blob), "bytes_code": counted, "bytes_code_raw": code.raw,
            "bytes_code_compressed": code.compressed, "bytes_total": len(blob) + counted,
            "budget_bytes": export.budget_bytes, "codec": export.codec, "code_files": code.files,
            "code_minified": code.minified, **({"code_note": code.note} if code.note else {})}


class Services:
    """The host services of `pgolf.api.HostServices`: shared calibration and export measurement."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.model: nn.Module | None = None
        self.hessians: dict[str, Tensor] | None = None

    def begin_export(self, model: nn.Module) -> None:
        self.model, self.hessians = model, None

    def end_export(self) -> None:
        self.model, self.hessians = None, None

    def calibration_hessians(self) -> Mapping[str, Tensor]:
        if self.hessians is None:
            s, model = self.session, self.model
            if model is None:
                raise RuntimeError("calibration Hessians exist only during the export stage")
            batches = s.hook.pgolf_provide_calibration_batches(model=model, ctx=s.ctx)
            if batches is None:
                raise ConfigError("calibration Hessians were requested but no enabled technique provides "
                                  "calibration batches", key="techniques", hint="Enable gptq.")

            def row_weights(ids: Tensor) -> Tensor | None:
                total = None
                for w in s.hook.pgolf_contribute_calibration_weights(input_ids=ids, ctx=s.ctx):
                    if w is not None:
                        total = w.float() if total is None else total * w.float()
                return total

            summed, rows = collect_hessians(model, batches, row_weights=row_weights, autocast=s.ctx.autocast)
            if s.dist.enabled:
                for name in sorted(summed):
                    dist.all_reduce(summed[name])
                    total = torch.tensor(rows[name], device=summed[name].device)
                    dist.all_reduce(total)
                    rows[name] = float(total)
            self.hessians = {n: h / max(rows[n], 1e-12) for n, h in summed.items()}
        return self.hessians

    def measure_export(self, state: Mapping[str, Tensor]) -> int:
        s = self.session
        tensors, _, _ = quantize_state(s, state)
        blob = encode_export(pack(tensors, {}), s.recipe.export)
        return bytes_info(s, blob, s.ctx.clock.step)["bytes_total"]


# --- eval ---------------------------------------------------------------------------------------


def eval_stage(session: Session, artifact: Artifact, train_info: Mapping[str, Any],
               stage_seconds: Mapping[str, float] | None = None,
               judged: tuple[str, ...] = ("train", "export", "eval")) -> Scored:
    r, ctx, ds = session.recipe, session.ctx, session.data
    session.reporter.stage("eval")
    start_stage = time.perf_counter()
    tensors, _meta = artifact.decode()  # verified: a damaged artifact is one clear error
    model = model_with(session, {name: dequantize(qt) for name, qt in tensors.items()})
    session.hook.pgolf_on_artifact_loaded(model=model, ctx=ctx)
    eval_parts = {"decode": time.perf_counter() - start_stage}
    ds.ledger.merge(artifact.ledger)
    export_info = {**artifact.info, **bytes_info(session, artifact.blob, train_info.get("steps"))}  # this run's code
    tokens, counts = limit_tokens(ds.val_tokens, ds.val_bytes, r.eval.max_tokens)
    windows = session.hook.pgolf_provide_eval_windows(ctx=ctx, num_tokens=int(tokens.shape[0]))
    cover = windows.expected_coverage(int(tokens.shape[0]))
    probe_at = frozenset(compliance.sample_audit_positions(cover, r.eval.audit_positions, r.seed))
    pristine = copy.deepcopy(model)
    before = state_checksum(model)
    sync(session.device)
    start = time.perf_counter()
    scores = evaluate_stream(session, model, tokens, counts, probe_at=probe_at, timings=eval_parts)
    sync(session.device)
    eval_seconds = time.perf_counter() - start
    weights_changed = state_checksum(model) != before
    val_loss, val_bpb = scores.loss_and_bpb()
    nll_sum, n_tokens, n_bytes = scores.totals()
    session.reporter.log(f"final val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} tokens:{n_tokens} bytes:{n_bytes} "
                         f"eval_time:{eval_seconds:.1f}s")
    start = time.perf_counter()
    scorer = session.hook.pgolf_provide_scorer(ctx=ctx)
    segment = max(4 * r.eval_seq_len + 1, int(getattr(scorer, "audit_tokens", 0)))
    calibration_reads = {"calibration", "frequency"} & {p for p, names in ds.ledger.reads.items() if names}
    audits = {
        "normalization": compliance.normalization(scores),
        "causality": compliance.causality(
            lambda t, b: evaluate_stream(session, copy.deepcopy(pristine), t, b), tokens, counts,
            r.model.vocab_size, r.seed, segment),
        "score_before_update": compliance.score_before_update(scores, weights_changed),
        "no_val_leakage": compliance.no_val_leakage(ds.ledger, ds, train_sample(ds)),
        "time_budget": compliance.time_budget(
            train_info["train_seconds"], train_info.get("averaging_seconds", 0.0), export_info["calibration_seconds"],
            bool(calibration_reads), r.train.max_wallclock_seconds or compliance.CHALLENGE_TRAIN_SECONDS,
            eval_parts, compliance.timed_eval_parts(eval_parts), r.eval.max_seconds, r.eval.compliance_policy),
        "mixer_gates": compliance.mixer_gates(scores.gates),
        "byte_budget": compliance.byte_budget(export_info["bytes_total"], r.export.budget_bytes),
        "byte_accounting": compliance.byte_accounting(ds),
        "data_fingerprint": compliance.data_fingerprint(ds, n_tokens, n_bytes),
    }
    audits["normalization"]["detail"] = {**audits["normalization"]["detail"], **compliance.exactly_once(scores)}
    eval_info = {"val_loss": val_loss, "val_bpb": val_bpb, "val_tokens": n_tokens, "val_bytes": n_bytes,
                 "val_nll_sum": nll_sum, "tokens_per_byte": n_tokens / n_bytes, "eval_seconds": eval_seconds,
                 "audit_seconds": time.perf_counter() - start,
                 "val_partial": r.eval.max_tokens is not None and r.eval.max_tokens < ds.val_tokens.size}
    metrics: dict[str, Any] = {}
    for batch in session.hook.pgolf_contribute_metrics(ctx=ctx):
        metrics.update(batch or {})
    result = build_result(session, dict(train_info), export_info, eval_info, audits, metrics)
    trace = Trace()  # the whole run: this session's calls, and the stored stages it did not make itself
    for part, sign in ((session.trace.to_dict(), 1), (artifact.trace, 1), (session.produced.to_dict(), -1)):
        trace.merge(part, sign)
    trace.configured = set(session.trace.configured)
    seconds = {**(stage_seconds or {}), "eval": time.perf_counter() - start_stage}
    scored = Scored(result, manifest(session, trace, seconds))
    silent = silent_techniques([e for e in session.enabled if e.stage in judged], trace)
    if silent:
        scored.result["error"] = f"enabled technique(s) {', '.join(silent)} never acted in this run"
        raise SilentTechniques(scored, silent)
    return scored


class SilentTechniques(RegistryError):
    """An enabled technique never acted: its ablation row would be a wrong result."""

    def __init__(self, scored: Scored, silent: list[str]) -> None:
        super().__init__(f"enabled technique(s) {', '.join(silent)} never acted in this run (no hook of their "
                         "stage fired and their configure changed nothing)",
                         hint="The technique is a silent no-op here; remove it or fix its hooks.")
        self.scored = scored


def evaluate_stream(session: Session, model: nn.Module, tokens: np.ndarray, byte_counts: np.ndarray,
                    probe_at: frozenset[int] = frozenset(), techniques: bool = True,
                    timings: dict[str, float] | None = None) -> TokenScores:
    """Windows -> scorer -> transforms over one token stream (the validation set or an audit segment);
    `timings` receives the seconds of scoring (windows, scorer, reduction), of the transforms, and of each
    sub-stage a scorer or transform reported in `TokenScores.stage_seconds` (taken out of the first two)."""
    ctx = session.ctx
    start = time.perf_counter()
    scores = TokenScores.empty(tokens, byte_counts)
    scores.probe_at = probe_at
    if techniques:
        windows = session.hook.pgolf_provide_eval_windows(ctx=ctx, num_tokens=int(tokens.shape[0]))
        scorer = session.hook.pgolf_provide_scorer(ctx=ctx)
    else:
        windows, scorer = plain_windows(int(tokens.shape[0]), session.recipe.eval_seq_len), WindowScorer()
    windows = scorer.windows_for(windows, tokens, ctx)
    scores.windows = windows
    scorer(model, scores, windows, ctx)
    scores.reduce()
    scored = time.perf_counter()
    in_scoring = sum(scores.stage_seconds.values())
    if techniques:
        session.hook.pgolf_on_scores(scores=scores, ctx=ctx)
    if timings is not None:  # sub-stages a scorer or transform measured are parts of their own
        in_transforms = sum(scores.stage_seconds.values()) - in_scoring
        timings.update(scoring=scored - start - in_scoring, transforms=time.perf_counter() - scored - in_transforms,
                       **scores.stage_seconds)
    return scores


def train_sample(ds: Dataset) -> np.ndarray | None:
    """Training tokens the run actually read, for the document-overlap audit."""
    names = set(ds.ledger.reads.get("train", [])) | set(ds.ledger.reads.get("calibration", []))
    parts = [np.asarray(read_shard(p)) for p in ds.train_files if p.name in names]
    return np.concatenate(parts) if parts else None


# --- report -------------------------------------------------------------------------------------


def build_result(session: Session, train_info: dict[str, Any], export_info: dict[str, Any],
                 eval_info: dict[str, Any], audits: dict[str, dict[str, Any]], metrics: dict[str, Any]) -> dict[str, Any]:
    """result.json: the same keys whichever command ran the stages."""
    r, ds = session.recipe, session.data
    valid, failed = compliance.summarize(audits)
    return {
        "recipe": r.name, "seed": r.seed, "scale": r.scale, "techniques": sorted(r.techniques),
        "val_loss": eval_info["val_loss"], "val_bpb": eval_info["val_bpb"],
        "val_loss_prequant": train_info.get("val_loss_prequant"), "val_bpb_prequant": train_info.get("val_bpb_prequant"),
        "val_tokens": eval_info["val_tokens"], "val_bytes": eval_info["val_bytes"],
        "tokens_per_byte": eval_info["tokens_per_byte"], "val_partial": eval_info["val_partial"],
        "bytes_code": export_info["bytes_code"], "bytes_model": export_info["bytes_model"],
        "bytes_total": export_info["bytes_total"], "train_seconds": train_info.get("train_seconds", 0.0),
        "calibration_seconds": export_info["calibration_seconds"], "eval_seconds": eval_info["eval_seconds"],
        "steps": train_info.get("steps", 0), "step_avg_ms": train_info.get("step_avg_ms", 0.0),
        "tokens_seen": train_info.get("tokens_seen", 0),
        "valid": valid, "failed_audits": failed, "compliance": audits, "metrics": metrics,
        "train": train_info, "export": export_info, "eval": eval_info,
        "data": {"fingerprint": ds.fingerprint, "tokenizer_sha256": file_sha(ds.tokenizer_path),
                 "val_bytes_total": int(ds.val_bytes.sum()), "transform": ds.transform},
    }


def manifest(session: Session, trace: Trace, stage_seconds: Mapping[str, float]) -> dict[str, Any]:
    """What ran, in what order, how often each hook fired and how long it took."""
    r = session.recipe
    return {
        **environment(session.device, session.dist),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": r.name, "scale": r.scale, "seed": r.seed,
        "techniques": [{"key": e.key, "name": e.name, "stage": e.stage, "module": e.cls.__module__,
                        "version": module_version(e.cls.__module__), "config": e.config_dict()}
                       for e in session.enabled],
        "hook_order": [e.name for e in session.enabled],
        "trace": trace.to_dict(),
        "configured_recipe": sorted(trace.configured),
        "data": session.data.describe() if session.dataset is not None else None,
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
    }


def stage_trace(session: Session, mark: dict[str, Any]) -> dict[str, Any]:
    """The hook calls of the stage that began at `mark`: what its product carries to later stages."""
    delta = session.trace.since(mark)
    session.produced.merge(delta)
    return delta


def file_sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# --- pgolf eval: the eval stage (and export, for a raw checkpoint) without training -----------------


def evaluate_target(target: Path, *, data: Path | None = None, tokenizer: Path | None = None,
                    with_techniques: list[str] = (), recipe: Path | None = None, scale: str | None = None,
                    overrides: list[str] = (), out_dir: Path | None = None, log: Any = print) -> dict[str, Any]:
    """Re-score an artifact or a run directory (eval-time techniques added with `with_techniques`
    measure their effect on identical weights), or export and score a raw `final_model.pt`."""
    from pgolf.model import model_fields_from_state
    from pgolf.products import ARTIFACT_FILE, load_state_dict
    from pgolf.recipe import RECIPES_DIR, load_recipe
    from pgolf.record_checkpoint import from_record_state

    target = Path(target)
    if target.is_dir():
        if not (target / ARTIFACT_FILE).is_file():
            raise DataError(f"{target} holds no {ARTIFACT_FILE}", hint="Pass a run directory written by pgolf run.")
        target = target / ARTIFACT_FILE
    if not target.is_file():
        raise DataError(f"not found: {target}", hint="Pass a run directory, an artifact.pga or a final_model.pt.")
    reporter = Reporter(quiet=True)
    reporter.log = log  # type: ignore[method-assign]
    if target.suffix == ".pt":
        state = from_record_state(load_state_dict(target))
        base = load_recipe(recipe or RECIPES_DIR / "baseline.yaml", scale=scale).to_dict()
        base["model"] = {**base["model"], **model_fields_from_state(state)}
        session = Session(recipe_from_dict(_with(base, data, tokenizer, with_techniques, overrides),
                                           Provenance(default_file=str(target))), reporter=reporter)
        load_data(session)
        checkpoint = checkpoint_from_state(session, state)
        artifact = export_stage(session, checkpoint)
        scored = eval_stage(session, artifact, checkpoint.info, judged=("export", "eval"))
    else:
        artifact = Artifact.from_file(target)
        _, meta = artifact.decode()
        session = Session(recipe_from_dict(_with(meta["recipe"], data, tokenizer, with_techniques, overrides),
                                           Provenance(default_file=str(target))), reporter=reporter)
        load_data(session)
        train_info = meta.get("train") or {"train_seconds": 0.0, "steps": 0}
        scored = eval_stage(session, artifact, train_info)
    if out_dir is not None:
        scored.write(Path(out_dir))
    return scored.result


def _with(base: Mapping[str, Any], data: Path | None, tokenizer: Path | None, with_techniques: list[str],
          overrides: list[str]) -> dict[str, Any]:
    """A recipe dict with --data/--tokenizer, eval-time techniques and --set overrides applied."""
    from pgolf.recipe import apply_override, parse_override

    out = copy.deepcopy(dict(base))
    techniques = dict(out.get("techniques") or {})
    for name in with_techniques:
        techniques.setdefault(name, {})
    out["techniques"] = techniques
    if data is not None:
        out.setdefault("data", {})["dir"] = str(data)
        out["data"]["tokenizer"] = str(tokenizer) if tokenizer else None
    elif tokenizer is not None:
        out.setdefault("data", {})["tokenizer"] = str(tokenizer)
    for text in overrides:
        apply_override(out, *parse_override(text))
    return out

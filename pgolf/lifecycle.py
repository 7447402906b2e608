"""The host program: configure -> data -> build -> train -> average -> export -> roundtrip -> eval -> report.

`Session` holds one recipe's resolved techniques, plugin manager and run context, and exposes
each stage as a method so the ablation runner can cache stage outputs (trained checkpoint,
artifact, result); `run_recipe` runs them all in order and writes the run directory. It reads
top to bottom like the challenge's train_gpt.py; techniques act only through the hooks in
`pgolf.hookspecs`.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import inspect
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import pgolf
from pgolf import compliance
from pgolf.artifact import code_bytes, decode_artifact, encode_artifact, pack
from pgolf.config import Provenance
from pgolf.context import Distributed, MetricsLog, RunContext
from pgolf.data import load_dataset
from pgolf.defaults import HostDefaults
from pgolf.errors import ConfigError, RegistryError
from pgolf.evaluate import TokenScores, evaluate_stream, limit_tokens
from pgolf.model import prepare_for_device
from pgolf.quant import default_spec, dequantize
from pgolf.recipe import Recipe, recipe_from_dict, recipe_summary_yaml
from pgolf.registry import STAGES, Trace, build_plugin_manager, resolve, silent_techniques
from pgolf.reporter import Reporter
from pgolf.train import TrainResult, train

RESULT_FILE = "result.json"
ARTIFACT_FILE = "artifact.pga"
CHECKPOINT_FILE = "final_model.pt"


def init_distributed() -> Distributed:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world_size=world, local_rank=local)


def pick_device(distributed: Distributed, requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", distributed.local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def state_checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def git_sha() -> str | None:
    root = Path(pgolf.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass
class TrainOutcome:
    model: nn.Module
    info: dict[str, Any]


@dataclass
class ExportOutcome:
    blob: bytes
    info: dict[str, Any]


@dataclass
class EvalOutcome:
    info: dict[str, Any]
    compliance: dict[str, dict[str, Any]]
    scores: TokenScores | None = field(default=None, repr=False)


class Session:
    """One recipe in one process: resolved techniques, traced plugin manager and run context."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        reporter: Reporter | None = None,
        out_dir: Path | None = None,
        distributed: Distributed | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.recipe = recipe
        self.recipe_dict = recipe.to_dict()  # as written, before techniques configure it
        self.reporter = reporter or Reporter()
        self.dist = distributed or Distributed()
        self.device = device or pick_device(self.dist)
        self.enabled = resolve(recipe.techniques, recipe.provenance)
        self.trace = Trace()
        self.pm = build_plugin_manager(self.enabled, HostDefaults(), self.trace)
        metrics = MetricsLog(out_dir / "metrics.jsonl" if out_dir is not None and self.dist.is_main else None)
        self.ctx = RunContext(recipe=recipe, device=self.device, dist=self.dist, enabled=self.enabled,
                              hook=self.pm.hook, pm=self.pm, out_dir=out_dir, log=self.reporter.log, metrics=metrics)
        self.hook = self.pm.hook
        self.hook.pgolf_configure(ctx=self.ctx)
        problems = [p for batch in self.hook.pgolf_contribute_config_errors(ctx=self.ctx) for p in (batch or [])]
        if problems:
            raise ConfigError(" ".join(problems), file=recipe.provenance.default_file, key="techniques")
        self.timings: dict[str, float] = {}

    # --- data ---------------------------------------------------------------------------------

    def load_data(self) -> None:
        r = self.recipe
        transform = self.hook.pgolf_provide_text_transform(ctx=self.ctx)
        start = time.perf_counter()
        self.ctx.data = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size, transform, r.data.train_shards)
        self.timings["data_seconds"] = time.perf_counter() - start
        d = self.ctx.data
        self.reporter.log(f"data: {d.source} {d.dir} train_shards:{len(d.train_files)} val_tokens:{d.val_tokens.size} "
                          f"val_bytes:{int(d.val_bytes.sum())} byte_source:{d.byte_source}")

    # --- build --------------------------------------------------------------------------------

    def new_model(self) -> nn.Module:
        """A freshly initialised model with every structure-changing technique applied."""
        model = self.hook.pgolf_provide_model(ctx=self.ctx)
        self.hook.pgolf_on_model_built(model=model, ctx=self.ctx)
        return prepare_for_device(model, self.device)

    def attach_loss_weights(self, model: nn.Module) -> None:
        """Per-token training loss weights (frequency weighting). Only training reads them, so a
        decoded artifact never asks for them (they may come from training-shard statistics)."""
        weights = [w for w in self.hook.pgolf_contribute_loss_weights(ctx=self.ctx) if w is not None]
        if weights:
            total = torch.ones(self.recipe.model.vocab_size)
            for w in weights:
                total = total * w.float().cpu()
            model.loss_weights = total.to(self.device)

    def _wrap(self, model: nn.Module) -> nn.Module:
        setting = self.recipe.train.compile
        wrapped = model
        if setting == "on" or (setting == "auto" and self.device.type == "cuda"):
            wrapped = torch.compile(model, dynamic=False, fullgraph=True)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            # Buffers (rotary tables) are identical on every rank: never re-broadcast them per forward.
            # Newer torch spells this forward_sync_buffers and warns on the old broadcast_buffers.
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else {"broadcast_buffers": False})
            wrapped = DDP(wrapped, device_ids=ids, **no_sync)
        return wrapped

    # --- train + average ----------------------------------------------------------------------

    def train(self) -> TrainOutcome:
        r, ctx = self.recipe, self.ctx
        self.reporter.stage("train")
        seed_everything(r.seed)
        model = self.new_model()
        self.attach_loss_weights(model)
        optimizers = self.hook.pgolf_provide_optimizers(model=model, ctx=ctx)
        ctx.train_reserve_seconds = float(sum(x for x in self.hook.pgolf_contribute_train_reserve_seconds(ctx=ctx) if x))
        params = sum(p.numel() for p in model.parameters())
        self.reporter.log(f"model_params:{params} device:{self.device} world_size:{self.dist.world_size} "
                          f"reserve:{ctx.train_reserve_seconds:.1f}s")
        result: TrainResult = train(model, self._wrap(model), optimizers, ctx, progress=self.reporter.progress)
        self.reporter.done()
        start = time.perf_counter()
        self.hook.pgolf_on_train_end(model=model, ctx=ctx)
        averaging = time.perf_counter() - start
        self.reporter.log(f"stopped at step {result.steps} after {result.train_seconds:.1f}s "
                          f"({result.step_avg_ms:.1f} ms/step){' (wallclock cap)' if result.stopped_early else ''}")
        pre = self.evaluate_plain(model)
        self.reporter.log(f"pre-quantization val_loss:{pre['val_loss']:.6f} val_bpb:{pre['val_bpb']:.6f}")
        info = {
            "steps": result.steps,
            "train_seconds": result.train_seconds,
            "averaging_seconds": averaging,
            "warmup_seconds": result.warmup_seconds,
            "stopped_early": result.stopped_early,
            "final_train_loss": result.final_train_loss,
            "tokens_seen": result.tokens_seen,
            "step_avg_ms": result.step_avg_ms,
            "wallclock_cap_seconds": result.wallclock_cap_seconds,
            "reserve_seconds": result.reserve_seconds,
            "model_params": params,
            "val_loss_prequant": pre["val_loss"],
            "val_bpb_prequant": pre["val_bpb"],
        }
        return TrainOutcome(model, info)

    def evaluate_plain(self, model: nn.Module) -> dict[str, float]:
        """The challenge's eval_val on the model as it is (no eval-stage techniques)."""
        tokens, counts = limit_tokens(self.ctx.dataset.val_tokens, self.ctx.dataset.val_bytes, self.recipe.eval.max_tokens)
        scores = evaluate_stream(model, tokens, counts, self.ctx, techniques=False)
        loss, bpb = scores.loss_and_bpb()
        return {"val_loss": loss, "val_bpb": bpb}

    # --- export -------------------------------------------------------------------------------

    def artifact_meta(self, train_info: dict[str, Any], calibration_seconds: float) -> dict[str, Any]:
        """What rebuilding and judging the model needs besides its weights (counted in the bytes)."""
        return {
            "pgolf_version": pgolf.__version__,
            "recipe": self.recipe_dict,
            "bos_id": self.ctx.dataset.bos_id if self.ctx.data is not None else 1,
            "train": train_info,
            "calibration_seconds": calibration_seconds,
            "trace": self.trace.to_dict(),
        }

    def bytes_info(self, blob: bytes) -> dict[str, Any]:
        """Artifact bytes = compressed model + the code this technique set ships."""
        code = code_bytes(sorted({e.cls.__module__ for e in self.enabled}))
        counted = code.compressed if self.recipe.export.code_bytes == "compressed" else code.raw
        return {"bytes_model": len(blob), "bytes_code": counted, "bytes_code_raw": code.raw,
                "bytes_code_compressed": code.compressed, "bytes_total": len(blob) + counted,
                "budget_bytes": self.recipe.export.budget_bytes, "codec": self.recipe.export.codec,
                "code_files": code.files}

    def export_info_for(self, blob: bytes, meta: dict[str, Any]) -> dict[str, Any]:
        """Export facts of a stored artifact, with code bytes for the techniques enabled now."""
        return {**self.bytes_info(blob), "calibration_seconds": float(meta.get("calibration_seconds", 0.0))}

    def export(self, model: nn.Module, train_info: dict[str, Any]) -> ExportOutcome:
        r, ctx = self.recipe, self.ctx
        self.reporter.stage("export")
        start = time.perf_counter()
        self.hook.pgolf_on_export_start(model=model, ctx=ctx)
        calibration = time.perf_counter() - start
        start = time.perf_counter()
        tensors = {}
        notes: dict[str, list[str]] = {}
        bits: dict[str, int] = {}
        for name, tensor in model.state_dict().items():
            t = tensor.detach().to("cpu")
            spec = default_spec(name, t, r.export)
            self.hook.pgolf_on_quant_spec(name=name, tensor=t, spec=spec, ctx=ctx)
            tensors[name] = self.hook.pgolf_quantize_tensor(name=name, tensor=t, spec=spec, ctx=ctx)
            if spec.notes:
                notes[name] = spec.notes
            bits[name] = spec.bits if spec.scheme == "int" else {"fp16": 16, "fp32": 32, "raw": 0}[spec.scheme]
        payload = pack(tensors, self.artifact_meta(train_info, calibration))
        blob = encode_artifact(payload, r.export.codec, r.export.level, r.export.byte_shuffle)
        info = {**self.bytes_info(blob), "bytes_payload": len(payload), "calibration_seconds": calibration,
                "quantize_seconds": time.perf_counter() - start, "quant_notes": notes, "bits": bits}
        self.reporter.log(f"artifact: model {info['bytes_model']:,} + code {info['bytes_code']:,} = "
                          f"{info['bytes_total']:,} bytes (budget {r.export.budget_bytes:,})")
        return ExportOutcome(blob, info)

    # --- roundtrip ------------------------------------------------------------------------------

    def load_artifact(self, blob: bytes) -> nn.Module:
        """Decode an artifact into a fresh model; everything after this uses only the artifact."""
        tensors, _meta = decode_artifact(blob)
        model = self.model_with({name: dequantize(qt) for name, qt in tensors.items()})
        self.hook.pgolf_on_artifact_loaded(model=model, ctx=self.ctx)
        return model

    def model_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A fresh model (already on the device, in its dtypes) holding `state`."""
        model = self.new_model()
        model.load_state_dict(state, strict=True)
        return model

    def load_checkpoint(self, state: dict[str, torch.Tensor], train_info: dict[str, Any]) -> nn.Module:
        """Rebuild the trained model from a stored checkpoint, as the train stage left it.

        The ablation runner exports from cached checkpoints, so a fresh model gets the weights
        and the train-stage techniques re-activate what a state dict does not hold (recurrence
        turns looping on) through ``pgolf_on_artifact_loaded``; later-stage techniques are left
        out, because the checkpoint is a product of the train stage alone.
        """
        model = self.model_with(state)
        later = [e.instance for e in self.enabled if e.stage != "train"]
        self.pm.subset_hook_caller("pgolf_on_artifact_loaded", remove_plugins=later)(model=model, ctx=self.ctx)
        self.ctx.step = int(train_info.get("steps", 0))
        self.ctx.train_reserve_seconds = float(train_info.get("reserve_seconds", 0.0))
        return model

    # --- eval ---------------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, train_info: dict[str, Any], export_info: dict[str, Any]) -> EvalOutcome:
        r, ctx = self.recipe, self.ctx
        ds = ctx.dataset
        self.reporter.stage("eval")
        tokens, counts = limit_tokens(ds.val_tokens, ds.val_bytes, r.eval.max_tokens)
        windows = self.hook.pgolf_provide_eval_windows(ctx=ctx, num_tokens=int(tokens.shape[0]))
        cover = windows.expected_coverage(int(tokens.shape[0]))
        ctx.audit_positions = compliance.sample_audit_positions(cover, r.eval.audit_positions, r.seed)
        pristine = copy.deepcopy(model)
        before = state_checksum(model)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        scores = evaluate_stream(model, tokens, counts, ctx)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        eval_seconds = time.perf_counter() - start
        weights_changed = state_checksum(model) != before
        val_loss, val_bpb = scores.loss_and_bpb()
        nll_sum, n_tokens, n_bytes = scores.totals()
        self.reporter.log(f"val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} tokens:{n_tokens} bytes:{n_bytes} "
                          f"eval_time:{eval_seconds:.1f}s")
        start = time.perf_counter()
        scorer = self.hook.pgolf_provide_scorer(ctx=ctx)
        segment = max(4 * r.eval_seq_len + 1, int(getattr(scorer, "audit_tokens", 0)))
        checks = {
            "normalization": compliance.normalization(scores),
            "causality": compliance.causality(lambda: copy.deepcopy(pristine), tokens, counts, ctx, segment),
            "score_before_update": compliance.score_before_update(scores, weights_changed),
            "no_val_leakage": compliance.no_val_leakage(ds.ledger, ds, self._train_sample()),
            "time_budget": compliance.time_budget(
                train_info["train_seconds"] + train_info.get("averaging_seconds", 0.0) + export_info["calibration_seconds"],
                r.train.max_wallclock_seconds or compliance.CHALLENGE_TRAIN_SECONDS, eval_seconds, r.eval.max_seconds),
            "byte_budget": compliance.byte_budget(export_info["bytes_total"], r.export.budget_bytes),
            "byte_accounting": compliance.byte_accounting(ds),
        }
        checks["normalization"]["detail"] = {**checks["normalization"]["detail"], **compliance.exactly_once(scores)}
        audit_seconds = time.perf_counter() - start
        info = {
            "val_loss": val_loss,
            "val_bpb": val_bpb,
            "val_tokens": n_tokens,
            "val_bytes": n_bytes,
            "val_nll_sum": nll_sum,
            "tokens_per_byte": n_tokens / n_bytes,
            "eval_seconds": eval_seconds,
            "audit_seconds": audit_seconds,
            "val_partial": r.eval.max_tokens is not None and r.eval.max_tokens < ds.val_tokens.size,
        }
        return EvalOutcome(info, checks, scores)

    def _train_sample(self) -> np.ndarray | None:
        """Training tokens the run actually read, for the document-overlap check (capped)."""
        ds = self.ctx.dataset
        names = set(ds.ledger.reads.get("train", [])) | set(ds.ledger.reads.get("calibration", []))
        from pgolf.shards import read_shard

        parts = [np.asarray(read_shard(p)) for p in ds.train_files if p.name in names]
        return np.concatenate(parts) if parts else None

    # --- report -------------------------------------------------------------------------------

    def check_fired(self, extra_traces: list[dict[str, Any]] = (), stages: tuple[str, ...] = STAGES) -> None:
        """Fail when an enabled technique never ran a hook: a silent no-op is a wrong result.

        `extra_traces` are the traces of stages run earlier (a cached checkpoint or artifact);
        techniques of stages that did not run at all (`stages`) are not judged.
        """
        trace = Trace()
        trace.merge(self.trace.to_dict())
        for t in extra_traces:
            trace.merge(t)
        judged = [e for e in self.enabled if e.stage in stages or trace.calls(e.name)]
        silent = silent_techniques(judged, trace)
        if silent:
            raise RegistryError(f"enabled technique(s) {', '.join(silent)} never fired a hook in this run",
                                hint="The technique is a silent no-op here; remove it or fix its hooks.")

    def manifest(self, stage_seconds: dict[str, float]) -> dict[str, Any]:
        ds = self.ctx.data
        return {
            "pgolf_version": pgolf.__version__,
            "git_sha": git_sha(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu",
            "host": socket.gethostname(),
            "world_size": self.dist.world_size,
            "threads": torch.get_num_threads(),
            "recipe": self.recipe.name,
            "scale": self.recipe.scale,
            "seed": self.recipe.seed,
            "techniques": [
                {"key": e.key, "name": e.name, "stage": e.stage, "module": e.cls.__module__,
                 "version": _module_version(e.cls.__module__), "config": e.config_dict()}
                for e in self.enabled
            ],
            "hook_order": [e.name for e in self.enabled],
            "trace": self.trace.to_dict(),
            "data": ds.describe() if ds is not None else None,
            "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        }


def _module_version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    top = module.split(".")[0]
    for dist_name in packages_distributions().get(top, []):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            continue
    return pgolf.__version__


def session_from_artifact_meta(meta: dict[str, Any], extra_techniques: dict[str, Any] | None = None,
                               **kwargs: Any) -> Session:
    data = dict(meta["recipe"])
    if extra_techniques:
        data["techniques"] = {**(data.get("techniques") or {}), **extra_techniques}
    return Session(recipe_from_dict(data, Provenance(default_file="artifact")), **kwargs)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a crash never leaves a half-written result under the final name."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_result(recipe: Recipe, train_info: dict[str, Any], export_info: dict[str, Any], eval_outcome: EvalOutcome,
                 metrics: dict[str, Any]) -> dict[str, Any]:
    valid, failed = compliance.summarize(eval_outcome.compliance)
    e = eval_outcome.info
    return {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "scale": recipe.scale,
        "techniques": sorted(recipe.techniques),
        "val_loss": e["val_loss"],
        "val_bpb": e["val_bpb"],
        "val_loss_prequant": train_info["val_loss_prequant"],
        "val_bpb_prequant": train_info["val_bpb_prequant"],
        "val_tokens": e["val_tokens"],
        "val_bytes": e["val_bytes"],
        "tokens_per_byte": e["tokens_per_byte"],
        "val_partial": e["val_partial"],
        "bytes_code": export_info["bytes_code"],
        "bytes_model": export_info["bytes_model"],
        "bytes_total": export_info["bytes_total"],
        "train_seconds": train_info["train_seconds"],
        "calibration_seconds": export_info["calibration_seconds"],
        "eval_seconds": e["eval_seconds"],
        "steps": train_info["steps"],
        "step_avg_ms": train_info["step_avg_ms"],
        "tokens_seen": train_info["tokens_seen"],
        "valid": valid,
        "failed_audits": failed,
        "compliance": eval_outcome.compliance,
        "metrics": metrics,
    }


def collect_metrics(session: Session) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in session.hook.pgolf_contribute_metrics(ctx=session.ctx):
        out.update(batch or {})
    return out


def run_recipe(recipe: Recipe, out_dir: Path, reporter: Reporter | None = None,
               device: str | None = None) -> dict[str, Any]:
    """Run the whole lifecycle and write the run directory; returns result.json's content."""
    distributed = init_distributed()
    main = distributed.is_main
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    reporter = reporter or Reporter(quiet=not main)
    if main:
        for stale in ("log.txt", "metrics.jsonl"):
            (out_dir / stale).unlink(missing_ok=True)
        reporter.log_path = out_dir / "log.txt"
    session = Session(recipe, reporter=reporter, out_dir=out_dir, distributed=distributed,
                      device=pick_device(distributed, device))
    if main:
        (out_dir / "config.yaml").write_text(recipe_summary_yaml(recipe), encoding="utf-8")
    stage_seconds: dict[str, float] = {}
    t = time.perf_counter()
    session.load_data()
    stage_seconds["data"] = time.perf_counter() - t
    t = time.perf_counter()
    trained = session.train()
    stage_seconds["train"] = time.perf_counter() - t
    if main:
        torch.save({k: v.detach().cpu() for k, v in trained.model.state_dict().items()}, out_dir / CHECKPOINT_FILE)
    t = time.perf_counter()
    exported = session.export(trained.model, trained.info)
    stage_seconds["export"] = time.perf_counter() - t
    if main:
        (out_dir / ARTIFACT_FILE).write_bytes(exported.blob)
    t = time.perf_counter()
    loaded = session.load_artifact(exported.blob)
    evaluated = session.evaluate(loaded, trained.info, exported.info)
    stage_seconds["eval"] = time.perf_counter() - t
    metrics = collect_metrics(session)
    result = build_result(session.recipe, trained.info, exported.info, evaluated, metrics)
    result["train"] = trained.info
    result["export"] = exported.info
    result["eval"] = evaluated.info
    try:
        session.check_fired()
    except RegistryError as exc:
        result["error"] = str(exc)
        if main:
            write_json(out_dir / RESULT_FILE, result)
            write_json(out_dir / "manifest.json", session.manifest(stage_seconds))
        raise
    if main:
        write_json(out_dir / "manifest.json", session.manifest(stage_seconds))
        write_json(out_dir / RESULT_FILE, result)
    if distributed.enabled:
        dist.barrier()
    return result

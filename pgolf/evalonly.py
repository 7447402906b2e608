"""Evaluation without training: re-score an artifact, a run directory, or a raw checkpoint.

Adding eval-stage techniques (`--with sliding_window,ttt,ppm`) re-scores the same artifact,
so their effect is measured on identical weights; the ablation cache reuses this path. A raw
`final_model.pt` (pgolf's or one saved by the challenge's train_gpt.py) is exported with the
recipe's export settings first, so the reported score is the round-tripped one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pgolf.artifact import decode_artifact
from pgolf.config import Provenance
from pgolf.errors import DataError
from pgolf.lifecycle import ARTIFACT_FILE, RESULT_FILE, Reporter, Session, build_result, collect_metrics, write_json
from pgolf.recipe import RECIPES_DIR, apply_override, load_recipe, parse_override, recipe_from_dict

Log = Callable[[str], None]


def infer_model_fields(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model shape from a challenge-style state dict (tok_emb, blocks.{i}.attn.c_q, ...)."""
    try:
        vocab, dim = state["tok_emb.weight"].shape
        layers = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith(".attn.c_q.weight")})
        heads = int(state["blocks.0.attn.q_gain"].shape[0])
        head_dim = dim // heads
        kv_heads = int(state["blocks.0.attn.c_k.weight"].shape[0]) // head_dim
        hidden = int(state["blocks.0.mlp.fc.weight"].shape[0])
    except (KeyError, IndexError) as exc:
        raise DataError(f"the checkpoint does not look like the challenge's GPT (missing {exc})",
                        hint="pgolf eval reads state dicts saved by train_gpt.py or by pgolf.") from None
    return {"vocab_size": int(vocab), "model_dim": int(dim), "num_layers": layers, "num_heads": heads,
            "num_kv_heads": kv_heads, "mlp_mult": hidden / dim, "tie_embeddings": "lm_head.weight" not in state,
            "smear_gate": any(k.startswith("smear.") for k in state)}


def _recipe_dict_with(base: dict[str, Any], data: Path | None, tokenizer: Path | None, with_techniques: list[str],
                      overrides: list[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    techniques = out.setdefault("techniques", {}) or {}
    for name in with_techniques:
        techniques.setdefault(name, {})
    out["techniques"] = techniques
    if data is not None:
        out.setdefault("data", {})["dir"] = str(data)
        out["data"]["tokenizer"] = str(tokenizer) if tokenizer else None
    elif tokenizer is not None:
        out.setdefault("data", {})["tokenizer"] = str(tokenizer)
    for text in overrides:
        key, value = parse_override(text)
        apply_override(out, key, value)
    return out


def evaluate_target(target: Path, *, data: Path | None = None, tokenizer: Path | None = None,
                    with_techniques: list[str] = (), recipe: Path | None = None, scale: str | None = None,
                    overrides: list[str] = (), out_dir: Path | None = None, log: Log = print) -> dict[str, Any]:
    target = Path(target)
    if target.is_dir():
        candidate = target / ARTIFACT_FILE
        if not candidate.is_file():
            raise DataError(f"{target} holds no {ARTIFACT_FILE}", hint="Pass a run directory written by pgolf run.")
        target = candidate
    if not target.is_file():
        raise DataError(f"not found: {target}", hint="Pass a run directory, an artifact.pga or a final_model.pt.")
    reporter = Reporter(quiet=True)
    reporter.log = lambda m: log(m)  # type: ignore[method-assign]
    if target.suffix == ".pt":
        return _evaluate_checkpoint(target, data, tokenizer, list(with_techniques), recipe, scale, list(overrides),
                                    out_dir, reporter)
    blob = target.read_bytes()
    _, meta = decode_artifact(blob)
    recipe_dict = _recipe_dict_with(meta["recipe"], data, tokenizer, list(with_techniques), list(overrides))
    session = Session(recipe_from_dict(recipe_dict, Provenance(default_file=str(target))), reporter=reporter)
    session.load_data()
    model = session.load_artifact(blob)
    train_info = meta.get("train") or {"train_seconds": 0.0, "steps": 0, "val_loss_prequant": float("nan"),
                                       "val_bpb_prequant": float("nan"), "step_avg_ms": 0.0, "tokens_seen": 0}
    export_info = session.export_info_for(blob, meta)
    return _finish(session, model, train_info, export_info, out_dir, meta.get("trace"))


def _evaluate_checkpoint(path: Path, data: Path | None, tokenizer: Path | None, with_techniques: list[str],
                         recipe: Path | None, scale: str | None, overrides: list[str], out_dir: Path | None,
                         reporter: Reporter) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise DataError(f"cannot read checkpoint {path}: {exc}", hint="Only plain tensor state dicts are loaded.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path} is not a state dict of tensors")
    base = load_recipe(recipe or RECIPES_DIR / "baseline.yaml", scale=scale).to_dict()
    base["model"] = {**base["model"], **infer_model_fields(state)}
    recipe_dict = _recipe_dict_with(base, data, tokenizer, with_techniques, overrides)
    session = Session(recipe_from_dict(recipe_dict, Provenance(default_file=str(path))), reporter=reporter)
    session.load_data()
    model = session.new_model()
    missing = model.load_state_dict({k: v.to(next(model.parameters()).dtype) if v.is_floating_point() else v
                                     for k, v in state.items()}, strict=False)
    if missing.missing_keys or missing.unexpected_keys:
        raise DataError(f"checkpoint does not match the recipe's model: missing {missing.missing_keys[:5]}, "
                        f"unexpected {missing.unexpected_keys[:5]}", hint="Pass the --recipe it was trained with.")
    session.hook.pgolf_on_artifact_loaded(model=model, ctx=session.ctx)  # trained weights in: eval-time structure on
    pre = session.evaluate_plain(model)
    reporter.log(f"checkpoint as saved: val_loss:{pre['val_loss']:.8f} val_bpb:{pre['val_bpb']:.8f}")
    train_info = {"train_seconds": 0.0, "steps": 0, "step_avg_ms": 0.0, "tokens_seen": 0,
                  "val_loss_prequant": pre["val_loss"], "val_bpb_prequant": pre["val_bpb"]}
    exported = session.export(model, train_info)
    loaded = session.load_artifact(exported.blob)
    return _finish(session, loaded, train_info, exported.info, out_dir)


def _finish(session: Session, model: torch.nn.Module, train_info: dict[str, Any], export_info: dict[str, Any],
            out_dir: Path | None, earlier_trace: dict[str, Any] | None = None) -> dict[str, Any]:
    evaluated = session.evaluate(model, train_info, export_info)
    result = build_result(session.recipe, train_info, export_info, evaluated, collect_metrics(session))
    result["eval"] = evaluated.info
    session.check_fired([earlier_trace] if earlier_trace else [], stages=("export", "eval"))
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / RESULT_FILE, result)
    return result


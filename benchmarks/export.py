"""Export benchmark: quantize + compress the baseline-size model (9 x 512) on CPU, RTN vs GPTQ.

For each variant it reports quantize and compress seconds and the artifact bytes against the
empirical (zero-order, per-tensor) entropy of the quantized symbols. It also settles a storage
question for sandwich_quant: int5-int8 codes kept in int8 containers and left to the entropy coder,
versus codes bit-packed to exactly `bits` bits before the same coder.

Weights are a trained checkpoint when one is given (``--checkpoint final_model.pt``), otherwise
synthetic: heavy-tailed rows (Student-t, 5 degrees of freedom) with log-normally spread row scales,
which matches the shape, not the values, of trained matrices. GPTQ's Hessians come from forward
passes of random token batches. Timings are wall-clock on however many cores torch may use; the
last line printed is one JSON object with every figure.

    python benchmarks/export.py                     # about 2-4 minutes on 2 cores
    python benchmarks/export.py --checkpoint runs/x/final_model.pt --calib-batches 8

``--components`` instead prices the final records' export components on the records' model shape
(11 x 512, MLP 4x, vocab 8192, dense attention gates as #1736), int6 SDClip blocks and int7 embedding:
the fp16 passthrough of small floats (control tensors included, as #1530-#2135) against the
baseline's fp32 control tensors, QuantGate, LQER (#1855 g64, #2135 g32) and AWQ-lite (#1908). Each
figure is the brotli-11 (+ byte shuffle) size of the tensors the component changes, stored alone,
with and without it; round to nearest stands in for GPTQ (both honour the same specs).

``--pergroup`` packs that whole quantized state and compares pgolf's brotli-11 + byte shuffle with
the pergroup codec (#1855) for each installed coder and layout (minutes: ZPAQ is slow).

``--recipe recipes/records/pr2135.yaml`` builds a record recipe's model at full size through the host
(casefold dropped: it needs a tokenizer), fills it with the synthetic weights above and runs the recipe's
own export as far as it goes without data: its quantization hooks (sandwich, SDClip, QuantGate, LQER,
AWQ-lite, whichever it enables) and GPTQ on Hessians of random-token batches, its codec (pergroup
with lrzip when installed) and the code bytes pgolf counts for it, step-matched to the record's seed-42
run. It prints model + code bytes against the 16,000,000-byte budget (about 8 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pgolf
from pgolf.artifact import encode_artifact, encode_export, int8_matrices, pack
from pgolf.calibration import collect_hessians
from pgolf.codecs import GROUP_CODERS, LAYOUTS, coder_available, compress, group_matrices
from pgolf.host import Session, bytes_info, model_from_checkpoint, new_model, quantize_state
from pgolf.model import GPT
from pgolf.products import Checkpoint
from pgolf.quant import QuantizedTensor, QuantSpec, default_spec, quantize_rtn
from pgolf.recipe import ExportConfig, ModelConfig, load_recipe
from pgolf_plugins.awq_lite import AWQLiteConfig, protect
from pgolf_plugins.gptq import factorize, gptq_quantize
from pgolf_plugins.lqer import LQERConfig, correct_top_k
from pgolf_plugins.quant_gate import QuantGateConfig, gate_spec, is_gate
from pgolf_plugins.sandwich_quant import SandwichConfig, sandwich_bits
from pgolf_plugins.sdclip import SDClipConfig, apply_sdclip, tensor_role


def synthetic_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Heavy-tailed rows with spread scales for every matrix; the rest as initialised (seeded globally)."""
    student = torch.distributions.StudentT(5.0)
    state = {}
    for name, t in model.state_dict().items():
        if t.ndim == 2 and t.numel() > 65_536:
            noise = student.sample(t.shape)
            rows = torch.exp(torch.randn(t.shape[0], 1) * 0.3)
            state[name] = (noise * rows * (0.5 / t.shape[1] ** 0.5)).float()
        else:
            state[name] = t.detach().clone()
    return state


def entropy_bytes(codes: torch.Tensor) -> float:
    """Zero-order entropy of one tensor's integer codes, in bytes."""
    _, counts = np.unique(codes.numpy(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() * counts.sum() / 8)


def symbol_bytes(tensors: dict[str, QuantizedTensor]) -> dict[str, float]:
    """Entropy of every code tensor plus the raw bytes of everything else (scales, passthrough)."""
    codes = sum(entropy_bytes(qt.parts["q"]) for qt in tensors.values() if "q" in qt.parts)
    other = sum(t.numel() * t.element_size() for qt in tensors.values() for k, t in qt.parts.items() if k != "q")
    return {"codes_entropy_bytes": codes, "other_raw_bytes": float(other)}


def spec_for(name: str, t: torch.Tensor, variant: str, layers: int) -> QuantSpec:
    spec = default_spec(name, t, ExportConfig())
    if variant != "int8_baseline" and spec.scheme == "int":
        spec.bits = sandwich_bits(name, layers, SandwichConfig(outer_layers=0, middle_bits=6, embed_bits=8))
        sd = SDClipConfig(embed_sigmas=20.0)  # #1394: int6 blocks k 12.85, int8 embedding k 20
        k = {"embed": sd.embed_sigmas, "attn": sd.matrix_sigmas, "mlp": sd.matrix_sigmas,
             "matrix": sd.matrix_sigmas}[tensor_role(name)]
        apply_sdclip(spec, k)
    return spec


def run_variant(state: dict[str, torch.Tensor], variant: str, layers: int, codec: str, shuffle: int,
                hessians: dict[str, torch.Tensor] | None) -> tuple[dict[str, Any], dict[str, QuantizedTensor]]:
    start = time.perf_counter()
    tensors = {}
    for name, t in state.items():
        spec = spec_for(name, t, variant, layers)
        if hessians is not None and spec.scheme == "int" and name in hessians:
            tensors[name] = gptq_quantize(t, factorize(hessians[name]), spec)
        else:
            tensors[name] = quantize_rtn(name, t, spec)
    quantize_s = time.perf_counter() - start
    payload = pack(tensors, {})
    start = time.perf_counter()
    blob = encode_artifact(payload, codec, None, shuffle)
    compress_s = time.perf_counter() - start
    symbols = symbol_bytes(tensors)
    floor = symbols["codes_entropy_bytes"] + symbols["other_raw_bytes"]
    return {"quantize_seconds": round(quantize_s, 3), "compress_seconds": round(compress_s, 3),
            "codec": codec + ("+shuffle" if shuffle else ""), "payload_bytes": len(payload), "artifact_bytes": len(blob),
            **{k: round(v) for k, v in symbols.items()},
            "artifact_over_entropy": round(len(blob) / floor, 4)}, tensors


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Codes in [-R, R] stored as exactly `bits` unsigned bits each (offset by R)."""
    offset = (codes.astype(np.int16) + (2 ** (bits - 1) - 1)).astype(np.uint8)
    planes = np.unpackbits(offset[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(planes.reshape(-1)).tobytes()


def storage_comparison(state: dict[str, torch.Tensor], names: list[str], codecs: list[tuple[str, int]]) -> dict[str, Any]:
    """int8 containers vs bit-packed codes, both through the same codec, per width."""
    out: dict[str, Any] = {}
    for bits in (5, 6, 7):  # at 8 bits packing is the identity
        codes = []
        for name in names:
            spec = QuantSpec("int", bits=bits)
            apply_sdclip(spec, 12.85 * 2 ** (bits - 6))  # (b, k) ~ (b+1, 2k): the same clip for each width
            codes.append(quantize_rtn(name, state[name], spec).parts["q"].numpy().reshape(-1))
        flat = np.concatenate(codes)
        container = flat.astype(np.int8).tobytes()
        packed = pack_bits(flat, bits)
        row: dict[str, Any] = {"codes": int(flat.size), "entropy_bytes": round(entropy_bytes(torch.from_numpy(flat)))}
        for codec, shuffle in codecs:
            row[f"{codec}_int8_container"] = len(compress(container, codec, None, shuffle))
            row[f"{codec}_bitpacked"] = len(compress(packed, codec, None, shuffle))
        out[f"int{bits}"] = row
    winners = {k: ("int8_container" if all(v[f"{c}_int8_container"] <= v[f"{c}_bitpacked"] for c, _ in codecs)
                   else "bitpacked") for k, v in out.items()}
    return {"by_width": out, "winner": winners}


def compressed(tensors: dict[str, QuantizedTensor]) -> int:
    return len(encode_artifact(pack(tensors, {}), "brotli", None, 2))


def records_state(seed: int, layers: int = 11) -> tuple[GPT, dict[str, torch.Tensor]]:
    """The records' model shape with synthetic weights (small tensors jittered off their initial constants)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(num_layers=layers, model_dim=512, mlp_mult=4, vocab_size=8192, attn_gate="dense",
                            attn_gate_init_std=0.005))
    state = trained_like_state(model)
    model.load_state_dict(state)
    return model, state


def trained_like_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`synthetic_state`, with the small tensors jittered: trained ones are not their constant initial values."""
    state = synthetic_state(model)
    for name, t in state.items():
        if t.is_floating_point() and t.numel() <= 65_536:
            state[name] = t + 0.05 * torch.randn_like(t)
    return state


def records_specs(state: dict[str, torch.Tensor], cfg: ExportConfig, gates: bool) -> dict[str, QuantSpec]:
    """int6 SDClip blocks and int7 embedding as #1855 (k 15 / 13 / 12), optionally QuantGate's int8 gates."""
    specs = {}
    for name, t in state.items():
        specs[name] = spec = default_spec(name, t, cfg)
        if spec.scheme == "int":
            spec.bits = 7 if name.startswith("tok_emb") else 6
            apply_sdclip(spec, {"embed": 15.0, "attn": 13.0, "mlp": 12.0, "matrix": 12.85}[tensor_role(name)])
        if gates and is_gate(name, t, QuantGateConfig()):
            gate_spec(spec)
    return specs


def pergroup_bytes(seed: int, coders: list[str], layouts: list[str], layers: int = 11) -> dict[str, Any]:
    """The whole quantized state of the records' shape: pgolf's brotli-11 + byte shuffle against the
    pergroup codec per coder and layout (brotli as the group coder isolates the layout's own effect)."""
    _, state = records_state(seed, layers)
    specs = records_specs(state, ExportConfig(keep_control_fp32=False), True)
    payload = pack({n: quantize_rtn(n, state[n], specs[n]) for n in state}, {})
    matrices = int8_matrices(payload)
    grouped = [m for _, members in group_matrices(matrices, "roles") for m, _ in members]
    out: dict[str, Any] = {"payload_bytes": len(payload), "grouped_code_bytes": sum(m.rows * m.cols for m in grouped),
                           "grouped_matrices": len(grouped)}
    start = time.perf_counter()
    out["brotli_shuffle"] = len(encode_artifact(payload, "brotli", None, 2))
    out["brotli_shuffle_seconds"] = round(time.perf_counter() - start, 1)
    for layout in layouts:
        for coder in coders:
            start = time.perf_counter()
            blob = encode_artifact(payload, "pergroup", None, 2, coder, layout)
            out[f"pergroup_{layout}_{coder}"] = len(blob)
            out[f"pergroup_{layout}_{coder}_seconds"] = round(time.perf_counter() - start, 1)
            print(layout, coder, len(blob), flush=True)
    return {"benchmark": "export_pergroup", "model": f"{layers}x512 mlp4 vocab8192 dense gates, int6/int7 SDClip RTN",
            "seed": seed, "weights": "synthetic student-t rows", "bytes": out}


def component_bytes(seed: int, calib_batches: int) -> dict[str, Any]:
    """Bytes each of the final records' export components saves (negative) or costs, on the records' shape."""
    model, state = records_state(seed)
    batches = [torch.randint(0, 8192, (4, 256)) for _ in range(calib_batches)]
    summed, rows = collect_hessians(model, batches)
    hessians = {n: h / rows[n] for n, h in summed.items()}

    def specs_for(cfg: ExportConfig, gates: bool) -> dict[str, QuantSpec]:
        return records_specs(state, cfg, gates)

    def quantized(specs: dict[str, QuantSpec], names: list[str]) -> dict[str, QuantizedTensor]:
        return {n: quantize_rtn(n, state[n], specs[n]) for n in names}

    out: dict[str, Any] = {}
    small = [n for n, t in state.items() if t.is_floating_point() and t.numel() <= 65_536 and not n.endswith("attn_gate_w")]
    gates = [n for n in state if n.endswith("attn_gate_w")]
    baseline_rule = compressed(quantized(specs_for(ExportConfig(), False), small))
    out["small_floats"] = {"tensors": len(small), "baseline_control_fp32": baseline_rule,
                           "records_all_fp16": compressed(quantized(specs_for(ExportConfig(keep_control_fp32=False),
                                                                              False), small)),
                           "all_fp32": compressed(quantized(specs_for(ExportConfig(small_float_dtype="fp32"), False),
                                                            small))}
    out["quant_gate"] = {"tensors": len(gates),
                         "baseline_control_fp32": compressed(quantized(specs_for(ExportConfig(), False), gates)),
                         "records_fp16": compressed(quantized(specs_for(ExportConfig(keep_control_fp32=False), False),
                                                              gates)),
                         "int8_rows": compressed(quantized(specs_for(ExportConfig(), True), gates))}
    base_specs = specs_for(ExportConfig(keep_control_fp32=False), True)
    matrices = [n for n, s in base_specs.items() if s.scheme == "int" and n in hessians]
    base = quantized(base_specs, matrices)
    for group in (64, 32):
        tensors = dict(base)
        chosen = correct_top_k(tensors, state, LQERConfig(group=group), min_numel=65_536)
        out[f"lqer_g{group}"] = {"tensors": list(chosen), "without": compressed({n: base[n] for n in chosen}),
                                 "with": compressed({n: tensors[n] for n in chosen})}
    awq_specs = specs_for(ExportConfig(keep_control_fp32=False), True)
    picked = protect(awq_specs, state, hessians, AWQLiteConfig())
    out["awq_lite"] = {"groups": picked, "without": compressed({n: base[n] for n in picked}),
                       "with": compressed(quantized(awq_specs, list(picked)))}
    for entry in out.values():
        if "with" in entry:
            entry["delta"] = entry["with"] - entry["without"]
    return {"benchmark": "export_components", "model": "11x512 mlp4 vocab8192 dense gates", "seed": seed,
            "weights": "synthetic student-t rows", "components": out}


# The record's own accounting, train_seed42.log lines 196-211 and README "Results" (#2135 on the PR branch,
# records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32): its maximum artifact over 3 seeds.
RECORD_BYTES = {"pr2135": {"steps": 5001, "bytes_model": 15_910_335, "bytes_code": 37_155, "bytes_total": 15_947_490}}


def recipe_artifact_bytes(path: Path, seed: int, calib_batches: int, calib_seqs: int, calib_len: int) -> dict[str, Any]:
    """A recipe's full-size artifact on synthetic weights, through the host's own export path.

    The host's export stage needs data only for GPTQ's calibration batches, so the Hessians are
    collected here from random-token batches through the recipe's model (looping on, as exported)
    and handed to the host's calibration service; every quantization and codec hook runs as in a run.
    """
    recipe = load_recipe(path)
    recipe.techniques.pop("casefold", None)  # a text transform: it needs a tokenizer, and changes no tensor
    session = Session(recipe, device=torch.device("cpu"))
    torch.manual_seed(seed)
    state = trained_like_state(new_model(session))
    record = RECORD_BYTES.get(recipe.name, {})
    model = model_from_checkpoint(session, Checkpoint(state, {"steps": record.get("steps", 0)}))

    start = time.perf_counter()
    vocab = recipe.model.vocab_size
    batches = [torch.randint(0, vocab, (calib_seqs, calib_len)) for _ in range(calib_batches)]
    summed, rows = collect_hessians(model, batches)
    calib_s = time.perf_counter() - start
    services = session.services
    services.begin_export(model)
    services.hessians = {n: h / max(rows[n], 1e-12) for n, h in summed.items()}
    session.hook.pgolf_on_export_start(model=model, ctx=session.ctx)
    start = time.perf_counter()
    tensors, _, bits = quantize_state(session, model.state_dict())
    quantize_s = time.perf_counter() - start
    meta = {"pgolf_version": pgolf.__version__, "recipe": session.recipe_dict, "bos_id": 1,
            "train": {"steps": record.get("steps", 0)}, "calibration_seconds": calib_s,
            "trace": session.trace.to_dict()}  # what the export stage stores beside the tensors
    payload = pack(tensors, meta)
    start = time.perf_counter()
    blob = encode_export(payload, session.recipe.export)
    compress_s = time.perf_counter() - start
    info = bytes_info(session, blob, record.get("steps"))
    metrics = {k: v for d in session.hook.pgolf_contribute_metrics(ctx=session.ctx) if d for k, v in d.items()}
    services.end_export()
    quantizer = ("gptq on synthetic Hessians (random-token batches)" if "gptq" in recipe.techniques
                 else "round to nearest")
    return {"benchmark": "export_recipe", "recipe": str(path), "seed": seed,
            "weights": "synthetic student-t rows (not trained)", "quantizer": quantizer,
            "calibration_tokens": calib_batches * calib_seqs * calib_len, "hessians": len(summed),
            "gptq_rtn_fallback": metrics.get("gptq_rtn_fallback", []), "lqer": metrics.get("lqer_tensors"),
            "params": sum(t.numel() for t in state.values()),
            "bits": {b: sum(1 for v in bits.values() if v == b) for b in sorted(set(bits.values()))},
            "calibration_seconds": round(calib_s, 1), "quantize_seconds": round(quantize_s, 1),
            "compress_seconds": round(compress_s, 1), "payload_bytes": len(payload),
            "codec": f"{info['codec']}/{session.recipe.export.group_coder}/{session.recipe.export.group_layout}",
            **{k: info[k] for k in ("bytes_model", "bytes_code", "bytes_total", "budget_bytes")},
            "margin_bytes": info["budget_bytes"] - info["bytes_total"],
            "record": record}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a final_model.pt of the 9x512 model")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--calib-seqs", type=int, default=4)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--components", action="store_true", help="price the final records' export components")
    parser.add_argument("--pergroup", action="store_true",
                        help="the pergroup codec vs brotli + shuffle on the records' whole quantized state")
    parser.add_argument("--coders", default=",".join(GROUP_CODERS), help="pergroup coders to try (installed ones)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="pergroup layouts to try")
    parser.add_argument("--pergroup-layers", type=int, default=11, help="layers of the records' shape to price")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="a record recipe: its full-size artifact bytes on synthetic weights, e.g. "
                             "recipes/records/pr2135.yaml")
    args = parser.parse_args()
    if args.recipe is not None:
        out = recipe_artifact_bytes(args.recipe, args.seed, args.calib_batches, args.calib_seqs, args.calib_len)
        print(f"{out['recipe']}: {out['params']:,} params, {out['weights']}, {out['quantizer']}, codec {out['codec']}")
        print(f"model {out['bytes_model']:,} + code {out['bytes_code']:,} = {out['bytes_total']:,} bytes; "
              f"margin to {out['budget_bytes']:,}: {out['margin_bytes']:,} bytes")
        if out["record"]:
            rec = out["record"]
            print(f"the record's own (seed 42, its maximum): model {rec['bytes_model']:,} + code {rec['bytes_code']:,} "
                  f"= {rec['bytes_total']:,} bytes; margin {out['budget_bytes'] - rec['bytes_total']:,}")
        print(json.dumps(out))
        return
    if args.pergroup:
        coders = [c for c in args.coders.split(",") if coder_available(c)]
        print(json.dumps(pergroup_bytes(args.seed, coders, args.layouts.split(","), args.pergroup_layers)))
        return
    if args.components:
        print(json.dumps(component_bytes(args.seed, args.calib_batches)))
        return
    torch.manual_seed(args.seed)
    cfg = ModelConfig(num_layers=args.layers, model_dim=args.dim)
    model = GPT(cfg)
    if args.checkpoint is not None:
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in torch.load(args.checkpoint, map_location="cpu", weights_only=True).items()}
        source = str(args.checkpoint)
    else:
        state = synthetic_state(model)
        source = "synthetic student-t rows"
    model.load_state_dict(state)
    params = sum(t.numel() for t in state.values())

    start = time.perf_counter()
    batches = [torch.randint(0, cfg.vocab_size, (args.calib_seqs, args.calib_len)) for _ in range(args.calib_batches)]
    summed, rows = collect_hessians(model, batches)
    hessians = {n: h / rows[n] for n, h in summed.items()}
    calib_s = time.perf_counter() - start

    results: dict[str, Any] = {}
    results["rtn_int8_zlib"], _ = run_variant(state, "int8_baseline", args.layers, "zlib", 0, None)
    print("rtn_int8_zlib", results["rtn_int8_zlib"], flush=True)
    results["rtn_int6_sdclip_zlib"], rtn6 = run_variant(state, "int6_sdclip", args.layers, "zlib", 0, None)
    print("rtn_int6_sdclip_zlib", results["rtn_int6_sdclip_zlib"], flush=True)
    results["rtn_int6_sdclip_brotli"], _ = run_variant(state, "int6_sdclip", args.layers, "brotli", 2, None)
    print("rtn_int6_sdclip_brotli", results["rtn_int6_sdclip_brotli"], flush=True)
    results["gptq_int6_sdclip_brotli"], gptq6 = run_variant(state, "int6_sdclip", args.layers, "brotli", 2, hessians)
    print("gptq_int6_sdclip_brotli", results["gptq_int6_sdclip_brotli"], flush=True)
    changed = sum(int((rtn6[n].parts["q"] != gptq6[n].parts["q"]).sum()) for n in hessians if "q" in rtn6[n].parts)
    codes = sum(rtn6[n].parts["q"].numel() for n in hessians if "q" in rtn6[n].parts)

    subset = [f"blocks.{i}.mlp.fc.weight" for i in range(min(3, args.layers))]
    storage = storage_comparison(state, subset, [("zlib", 0), ("lzma", 0), ("brotli", 2)])
    print("storage", json.dumps(storage), flush=True)

    summary = {
        "benchmark": "export",
        "model": f"{args.layers}x{args.dim}",
        "params": params,
        "weights": source,
        "threads": torch.get_num_threads(),
        "calibration_seconds": round(calib_s, 3),
        "calibration_tokens": args.calib_batches * args.calib_seqs * args.calib_len,
        "variants": results,
        "gptq_over_rtn_quantize_time": round(results["gptq_int6_sdclip_brotli"]["quantize_seconds"]
                                             / results["rtn_int6_sdclip_brotli"]["quantize_seconds"], 2),
        "gptq_codes_changed_fraction": round(changed / max(codes, 1), 4),
        "brotli_shuffle_over_zlib_int6": round(results["rtn_int6_sdclip_brotli"]["artifact_bytes"]
                                               / results["rtn_int6_sdclip_zlib"]["artifact_bytes"], 4),
        "storage": storage,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

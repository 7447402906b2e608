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
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.artifact import encode_artifact, pack
from pgolf.calibration import collect_hessians
from pgolf.codecs import compress
from pgolf.model import GPT
from pgolf.quant import QuantizedTensor, QuantSpec, default_spec, quantize_rtn
from pgolf.recipe import ExportConfig, ModelConfig
from pgolf_plugins.gptq import factorize, gptq_quantize
from pgolf_plugins.sandwich_quant import SandwichConfig, sandwich_bits
from pgolf_plugins.sdclip import SDClipConfig, apply_sdclip, tensor_role


def synthetic_state(model: GPT) -> dict[str, torch.Tensor]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a final_model.pt of the 9x512 model")
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--calib-seqs", type=int, default=4)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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

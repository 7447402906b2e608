"""Developer tool (not run by CI): figures from the records' own code, for pgolf's conformance tests.

    python tools/record_figures.py --challenge PATH/TO/parameter-golf [--record pr2135=PATH/train_gpt.py]

For each record below it imports that record's `train_gpt.py` (on CPU: flash-attention and Triton are
replaced by small stand-ins written here; the fused Triton CE is switched off, which the records' own
comments call numerically equal to their eager path), sets the hyperparameters its own log printed,
shrinks the model to a micro size, fills every parameter with seeded values, and writes
`tests/data/record_figures/<record>.npz`: the state dict by the record's own names (float16 values, so
both sides load the same numbers), fixed input tokens, and the record's logits and losses on them —
plain attention, and document-isolated attention where the record trains so. tests/test_record_figures.py
builds pgolf's recipe for the record at the same size, loads that state dict through pgolf's record
checkpoint adapter and compares. No record code is copied: the record is read from the given checkout.
"""

from __future__ import annotations

import argparse
import base64
import json
import lzma
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RECORDS_DIR = "records/track_10min_16mb"
# record -> (folder in the challenge repo, the log whose hyperparameters it ran with)
RECORDS = {
    "pr1493": ("2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT", "train_seed42.log"),
    "pr1855": ("2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611", "train_seed42.log"),
    "pr1868": ("2026-04-29_SmearGateBOSFix_3Seed_1.06141", "train_seed42_rerun_gptq8s.log"),
    "pr2135": ("2026-05-01_SP8192_PR2130Base_Calib32", "train_seed42.log"),
}
# The micro size every record is shrunk to (record env names). Six layers keep the records' block order:
# layers 2-3 looped, parallel lanes from layer 4 (after the loop, as 3-5 and 8 of 11 at full size).
MICRO_ENV = {
    "VOCAB_SIZE": 96, "NUM_LAYERS": 6, "MODEL_DIM": 32, "EMBEDDING_DIM": 32, "NUM_HEADS": 2,
    "NUM_KV_HEADS": 1, "MLP_MULT": 2.0, "ROPE_DIMS": 8, "XSA_LAST_N": 6, "LOOP_START": 2, "LOOP_END": 3,
    "NUM_LOOPS": 2, "PARALLEL_START_LAYER": 4, "PARALLEL_RESIDUAL_START": 4, "TRAIN_SEQ_LEN": 64,
    "ROPE_TRAIN_SEQ_LEN": 64, "EVAL_SEQ_LEN": 64, "FUSED_CE_ENABLED": 0,
}
SEQ_LEN = 64
BOS_ID = 1
WEIGHT_SEED = 20260501


def flash_attn_standin() -> types.ModuleType:
    """flash_attn_interface's two calls in the records, as SDPA on CPU ([B, T, H, D] layout)."""

    def attend(q, k, v, causal=True, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=q.size(2) != k.size(2))
        return out.transpose(1, 2)

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True, **_):
        cu = cu_seqlens_q.tolist()
        out = torch.zeros_like(q)
        for lo, hi in zip(cu[:-1], cu[1:], strict=True):
            if hi > lo:
                out[lo:hi] = attend(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], causal)[0]
        return out

    mod = types.ModuleType("flash_attn_interface")
    mod.flash_attn_func = attend
    mod.flash_attn_varlen_func = varlen
    return mod


class _Anything(types.ModuleType):
    """Triton stand-in: decorators return the function; every other attribute is another stand-in."""

    def __getattr__(self, name):
        if name == "jit":
            return lambda fn=None, **_: fn if fn is not None else (lambda f: f)
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        return self


TRITON_MODULES = ("triton", "triton.language", "triton.tools", "triton.tools.tensor_descriptor")


def install_standins() -> None:
    """Only while a record's module body runs: torch itself must never see the Triton stand-in."""
    import torch._dynamo  # noqa: F401
    import torch._functorch.aot_autograd  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401

    sys.modules["flash_attn_interface"] = flash_attn_standin()
    for name in TRITON_MODULES:
        sys.modules[name] = _Anything(name)


def remove_standins() -> None:
    for name in TRITON_MODULES:
        sys.modules.pop(name, None)


def record_source(path: Path) -> str:
    """The record's source; a minified record (`exec(lzma.decompress(b85decode(...)))`) is unwrapped."""
    text = path.read_text()
    m = re.search(r'b85decode\("(.*?)"\)', text, re.S)
    if m and len(text) < 40_000:
        raw = base64.b85decode(m.group(1))
        text = lzma.decompress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}]).decode()
    return pep701_to_311(text)


def pep701_to_311(source: str) -> str:
    """Python 3.12 f-strings may reuse their own quote inside braces; 3.11 needs the other quote there."""
    out, i, n = [], 0, len(source)
    while i < n:
        if source[i] in "fF" and i + 1 < n and source[i + 1] in "'\"" and not source[i - 1 : i].isalnum():
            quote, j, depth = source[i + 1], i + 2, 0
            out.append(source[i : i + 2])
            while j < n and not (source[j] == quote and depth == 0):
                ch = source[j]
                depth += ch == "{"
                depth -= ch == "}" and depth > 0
                out.append(("'" if quote == '"' else '"') if ch == quote and depth else ch)
                j += 1
            out.append(quote)
            i = j + 1
            continue
        out.append(source[i])
        i += 1
    return "".join(out)


def logged_hyperparameters(log: Path) -> dict[str, str]:
    """The `Hyperparameters:` block a record's log printed, as env assignments."""
    env, inside = {}, False
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("Hyperparameters:"):
            inside = True
            continue
        if inside:
            m = re.match(r"\s+(\w+): (.*)$", line)
            if not m:
                break
            key, value = m.group(1), m.group(2).strip()
            if value in ("True", "False"):
                value = "1" if value == "True" else "0"
            env[key.upper()] = value
    return env


def load_record(source: str, env: dict[str, str]) -> types.ModuleType:
    skip = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "DISTRIBUTED", "IS_MAIN_PROCESS", "LOGFILE", "RUN_ID"}
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k not in skip})
    install_standins()
    try:
        module = types.ModuleType("record_train_gpt")
        module.__dict__["__name__"] = "record_train_gpt"
        exec(compile(source, "record_train_gpt.py", "exec"), module.__dict__)
    finally:
        remove_standins()
        os.environ.clear()
        os.environ.update(saved)
    return module


def seeded_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict: its init plus seeded noise, rounded to float16."""
    gen = torch.Generator().manual_seed(WEIGHT_SEED)
    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().float()
        scale = 0.3 / max(1.0, t.shape[-1] ** 0.5) if t.ndim >= 2 else 0.1
        noise = torch.randn(t.shape, generator=gen) * scale
        state[name] = (t + noise).half().float()
    return state


def document_tokens(gen: torch.Generator, vocab: int) -> torch.Tensor:
    """[2, SEQ_LEN] tokens with BOS at document starts (a long and several short documents)."""
    tokens = torch.randint(2, vocab, (2, SEQ_LEN), generator=gen)
    for row, starts in ((0, (0, 23, 40, 41)), (1, (50,))):  # 41..113 in the flat row: longer than a sequence
        tokens[row, list(starts)] = BOS_ID
    return tokens


def figures(name: str, challenge: Path, override: Path | None) -> dict[str, np.ndarray]:
    folder, log_name = RECORDS[name]
    base = challenge / RECORDS_DIR / folder
    path = override or base / "train_gpt.py"
    log = (override.parent if override else base) / log_name
    env = logged_hyperparameters(log)
    env.update({k: str(v) for k, v in MICRO_ENV.items()})
    rec = load_record(record_source(path), env)
    if getattr(rec, "BOS_ID", 0) is None:
        rec.BOS_ID = BOS_ID  # the records' loader sets it from the first shard
    torch.manual_seed(0)
    h = rec.Hyperparameters()
    model = rec.GPT(h).float().eval()
    state = seeded_state(model)
    model.load_state_dict(state, strict=True)
    if hasattr(model, "looping_active"):
        model.looping_active = True
    gen = torch.Generator().manual_seed(7)
    tokens = document_tokens(gen, MICRO_ENV["VOCAB_SIZE"])
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    out: dict[str, np.ndarray] = {f"state/{k}": v.numpy().astype(np.float16) for k, v in state.items()}
    with torch.no_grad():
        out["inputs"], out["targets"] = inputs.numpy(), targets.numpy()
        if hasattr(rec, "_build_cu_seqlens"):
            # trained and scored with document-isolated attention: a batch packed as one row (as its loaders do)
            flat_in, flat_tg = inputs.reshape(1, -1), targets.reshape(1, -1)
            starts = (flat_in[0] == BOS_ID).nonzero().flatten().tolist()
            cu, max_len = rec._build_cu_seqlens(starts, flat_in.numel(), "cpu", h.train_seq_len, 64)
            out["doc_logits"] = model.forward_logits(flat_in, cu_seqlens=cu, max_seqlen=max_len).float().numpy()
            out["doc_loss"] = np.array(float(model(flat_in, flat_tg, cu_seqlens=cu, max_seqlen=max_len)))
        else:
            out["logits"] = model.forward_logits(inputs).float().numpy()
            out["loss"] = np.array(float(model(inputs, targets)))
    meta = {"record": name, "folder": folder, "log": log_name, "micro_env": MICRO_ENV, "seq_len": SEQ_LEN,
            "weight_seed": WEIGHT_SEED, "torch": torch.__version__}
    out["meta"] = np.array(json.dumps(meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--challenge", type=Path, required=True, help="a checkout of openai/parameter-golf")
    parser.add_argument("--record", action="append", default=[],
                        help="NAME=PATH: that record's train_gpt.py from elsewhere (a PR branch); its log beside it")
    parser.add_argument("--only", action="append", default=[], help="only these records")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/record_figures")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.record)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or RECORDS:
        override = Path(overrides[name]) if name in overrides else None
        data = figures(name, args.challenge, override)
        np.savez_compressed(args.out / f"{name}.npz", **data)
        loss = float(data["doc_loss"] if "doc_loss" in data else data["loss"])
        print(f"{name}: {sum(k.startswith('state/') for k in data)} tensors, loss {loss:.6f}")


if __name__ == "__main__":
    main()

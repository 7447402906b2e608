"""Recipes: YAML files that say which model, training, export, evaluation and techniques to run.

A recipe is loaded with `yaml.safe_load`, may inherit another with `base:`, may be scaled to a
CPU-sized run with a scale overlay (`recipes/scales/<name>.yaml`) and takes `key.path=value`
overrides. Every field lives in one dataclass below with the challenge baseline's value as its
default, so the hyperparameters are visible in one place (as in the challenge's train_gpt.py).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pgolf.config import Provenance, build_dataclass, to_plain
from pgolf.errors import ConfigError, PgolfError, raise_collected, suggest

TechniqueCheck = Callable[[dict[str, Any], Provenance], list[PgolfError]]  # the registry's, passed in
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SCALES_DIR = RECIPES_DIR / "scales"


@dataclass
class DataConfig:
    """Where tokens come from. `dir: null` means the embedded corpus (no download)."""

    dir: str | None = None
    tokenizer: str | None = None
    train_shards: int | None = None  # use only the first N training shards (None = all)


@dataclass
class ModelConfig:
    """The challenge baseline GPT (train_gpt.py) plus the record stack's architecture options."""

    vocab_size: int = 1024
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    activation: Literal["relu2", "leaky_relu2"] = "relu2"
    leaky_slope: float = 0.5
    rope_dims: int = 0  # rotary dims per head; 0 = all (partial RoPE uses 16)
    ln_scale: bool = False  # scale block norms by 1/sqrt(layer+1)
    xsa_last_n: int = 0  # exclusive self-attention on the last N layers
    parallel_start_layer: int = -1  # parallel residuals from this layer on; -1 = off
    parallel_variant: Literal["sum", "two_lane"] = "sum"  # x + attn + mlp (#1412/#1493) or two lanes (#1529)
    smear_gate: bool = False  # SmearGate (previous-token mix) at the input
    smear_bos_fix: bool = True  # never smear across a BOS (the record fix for cross-document leak)
    doc_isolation: bool = False  # attention never crosses a BOS; training packs rows as one stream (#1530 VarLen)
    skip_gates: bool = False  # U-Net skips mixed in as lerp(w * skip, x, sigmoid(g)), g init 0 (#1493 and later)
    # per-head gate on the attention output before proj: sparse (#1787), output (#1667) or dense (#1736)
    attn_gate: Literal["none", "sparse", "output", "dense"] = "none"
    attn_gate_window: int = 12  # leading input dims the sparse and output gates read (GATE_WINDOW)
    attn_gate_src: Literal["proj", "q"] = "proj"  # output gate input: the attention's input, or its q projection
    attn_gate_scale: float = 1.0  # sparse gate: sigmoid(scale * W x[:window])
    attn_gate_init_std: float = 0.0  # normal init of attn_gate_w (sparse, dense); 0 = zeros
    orthogonal_init: bool = False  # orthogonal init of the 2-D matrices with both dims >= 64 (#1855 and later)
    bigram_vocab_size: int = 0  # BigramHash buckets (the last one marks each row's first position); 0 = off
    bigram_dim: int = 128  # BigramHash table width, projected to model_dim when different
    asym_logit: bool = False  # separate positive/negative logit softcaps at eval (#1923)

    def validate(self) -> list[tuple[str, str]]:
        """Every (key, message) problem, not just the first."""
        problems: list[tuple[str, str]] = []
        if self.num_heads <= 0:
            problems.append(("num_heads", "num_heads must be positive"))
        if self.num_kv_heads <= 0:
            problems.append(("num_kv_heads", "num_kv_heads must be positive"))
        if self.num_heads > 0:
            if self.model_dim % self.num_heads:
                problems.append(("num_heads", f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}"))
            elif (self.model_dim // self.num_heads) % 2:
                problems.append(("num_heads", "head_dim (model_dim / num_heads) must be even for RoPE"))
            if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
                problems.append(("num_kv_heads",
                                 f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}"))
            if self.rope_dims % 2 or self.rope_dims > self.model_dim // self.num_heads:
                problems.append(("rope_dims", "rope_dims must be even and at most the head dimension (0 = all)"))
        if self.logit_softcap <= 0:
            problems.append(("logit_softcap", "logit_softcap must be positive"))
        if self.vocab_size > 65536:
            problems.append(("vocab_size", "the challenge shard format stores uint16 tokens: vocab_size must be <= 65536"))
        if self.attn_gate in ("sparse", "output") and not 1 <= self.attn_gate_window <= self.model_dim:
            problems.append(("attn_gate_window", f"the {self.attn_gate} attention gate reads the first "
                             f"attn_gate_window dims of a {self.model_dim}-dim input: it must lie in [1, "
                             f"{self.model_dim}], got {self.attn_gate_window}"))
        if self.attn_gate_init_std < 0:
            problems.append(("attn_gate_init_std", f"attn_gate_init_std must be >= 0, got {self.attn_gate_init_std}"))
        if self.bigram_vocab_size == 1 or self.bigram_vocab_size < 0:
            problems.append(("bigram_vocab_size", "bigram_vocab_size must be 0 (off) or at least 2 (hashed buckets "
                             f"plus the first-position bucket), got {self.bigram_vocab_size}"))
        if self.bigram_dim <= 0:
            problems.append(("bigram_dim", f"bigram_dim must be positive, got {self.bigram_dim}"))
        return problems


@dataclass
class TrainConfig:
    """Training length and batch; wallclock-capped like the challenge unless `iterations` is exact."""

    seq_len: int = 1024
    batch_tokens: int = 524_288
    iterations: int = 20_000
    warmup_steps: int = 20
    warmdown_iters: int = 1200
    warmdown_frac: float | None = None  # warmdown over this fraction of the run instead of iterations
    min_lr_scale: float = 0.0  # floor of the warmdown LR multiplier
    max_wallclock_seconds: float = 600.0  # 0 = no cap (step-matched runs)
    grad_accum_steps: int | None = None  # None = 8 // world_size, as the challenge script
    grad_clip_norm: float = 0.0
    log_every: int = 200
    compile: Literal["auto", "on", "off"] = "auto"  # auto = torch.compile on CUDA only

    def validate(self) -> list[tuple[str, str]]:
        """Every (key, message) problem, not just the first."""
        problems: list[tuple[str, str]] = []
        if self.seq_len <= 0 or self.batch_tokens <= 0:
            problems.append(("seq_len", "seq_len and batch_tokens must be positive"))
        elif self.batch_tokens % self.seq_len:
            problems.append(("batch_tokens", f"batch_tokens {self.batch_tokens} is not a multiple of seq_len {self.seq_len}"))
        if self.warmdown_frac is not None and not 0.0 <= self.warmdown_frac <= 1.0:
            problems.append(("warmdown_frac", "warmdown_frac must lie in [0, 1]"))
        return problems


@dataclass
class OptimConfig:
    """Muon for block matrices, Adam for embeddings and scalars (the baseline's split and rates)."""

    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_weight_decay: float = 0.0  # decoupled: p *= 1 - lr * wd
    muon_row_normalize: bool = False  # MuonEq-R
    muon_ns_coefficients: Literal["default", "polar_express"] = "default"  # Newton-Schulz (a, b, c) per iteration
    muon_wd_taper_start_frac: float = 1.0  # Muon WD tapers linearly from this elapsed fraction on (1 = never)
    muon_wd_taper_final_mult: float = 1.0  # ... to this multiple of muon_weight_decay at the end
    adam_weight_decay: float = 0.0  # decoupled (AdamW) on scalars and an untied head
    embed_weight_decay: float = 0.0  # decoupled (AdamW) on the token embedding
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8

    def validate(self) -> list[tuple[str, str]]:
        """Every (key, message) problem, not just the first."""
        problems: list[tuple[str, str]] = []
        if self.muon_backend_steps < 1:
            problems.append(("muon_backend_steps", f"muon_backend_steps must be at least 1, got {self.muon_backend_steps}"))
        if self.muon_ns_coefficients == "polar_express" and self.muon_backend_steps > 5:
            problems.append(("muon_backend_steps", "the polar_express Newton-Schulz table holds 5 iterations: "
                             f"muon_backend_steps must be at most 5, got {self.muon_backend_steps}"))
        if not 0.0 <= self.muon_wd_taper_start_frac <= 1.0:
            problems.append(("muon_wd_taper_start_frac", "muon_wd_taper_start_frac must lie in [0, 1], got "
                             f"{self.muon_wd_taper_start_frac}"))
        if self.muon_wd_taper_final_mult < 0.0:
            problems.append(("muon_wd_taper_final_mult", "muon_wd_taper_final_mult must not be negative, got "
                             f"{self.muon_wd_taper_final_mult}"))
        return problems


@dataclass
class ExportConfig:
    """Quantized export: the baseline's int8 per-row + zlib, and what counts toward the budget."""

    codec: Literal["zlib", "lzma", "brotli", "pergroup"] = "zlib"
    level: int | None = None  # None = the codec's strongest (zlib 9, lzma 9, brotli 11)
    byte_shuffle: int = 0  # 0 = off; 2 = shuffle bytes with stride 2 before compressing
    # pergroup (#1855, `pgolf.codecs`): the coder of the grouped int8 matrices (auto = lrzip, else the zpaq
    # binding, else brotli) and the grouping (roles: #1855-#2060; single: #2130/#2135).
    group_coder: Literal["auto", "lrzip", "zpaq", "brotli"] = "auto"
    group_layout: Literal["roles", "single"] = "roles"
    clip_percentile: float = 99.99984
    keep_float_max_numel: int = 65_536
    # Float tensors up to keep_float_max_numel pass through as fp16 (baseline and records); fp32 keeps them whole.
    small_float_dtype: Literal["fp16", "fp32"] = "fp16"
    # The baseline keeps control tensors (CONTROL_TENSOR_NAME_PATTERNS) in fp32; the records from #1530
    # (`gptq_mixed_quantize`) store them in fp16 with the rest.
    keep_control_fp32: bool = True
    code_bytes: Literal["compressed", "raw"] = "compressed"
    budget_bytes: int = 16_000_000


@dataclass
class EvalConfig:
    """Validation scoring; the default follows the challenge's eval_val exactly."""

    seq_len: int | None = None  # None = train.seq_len
    batch_tokens: int = 524_288
    max_seconds: float = 600.0
    max_tokens: int | None = None  # score only the first N validation tokens (quick looks; marked partial)
    audit_positions: int = 8  # positions sampled by the normalization and causality audits
    # How the time audit grades a run where the maintainers were inconsistent (pgolf.compliance.time_budget);
    # both verdicts are always recorded.
    compliance_policy: Literal["strict", "as-accepted"] = "strict"


@dataclass
class Recipe:
    """A resolved recipe. `techniques` stays raw here; the registry validates each section."""

    name: str = "recipe"
    description: str = ""
    seed: int = 1337
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    techniques: dict[str, Any] = field(default_factory=dict)
    scale: str | None = None
    provenance: Provenance = field(default_factory=Provenance, repr=False, compare=False)

    @property
    def eval_seq_len(self) -> int:
        return self.eval.seq_len or self.train.seq_len

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


SECTIONS = ("data", "model", "train", "optim", "export", "eval")
TOP_LEVEL = ("name", "description", "seed", "base", "techniques", "scale", *SECTIONS)


def _line_map(node: yaml.Node, prefix: str, file: str, out: dict[str, tuple[str, int | None]]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = (file, key_node.start_mark.line + 1)
            _line_map(value_node, key, file, out)


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, int | None]]]:
    """Parse one YAML file into data plus a dotted-key -> (file, line) map."""
    if not path.is_file():
        hint = None
        if path.parent.is_dir():
            hint = suggest(path.name, [p.name for p in path.parent.glob("*.yaml")])
        raise ConfigError(f"recipe file not found: {path}", hint=hint or "Check the path (recipes live in recipes/).")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"malformed YAML: {problem}",
            file=str(path),
            line=mark.line + 1 if mark else None,
            hint="Check indentation and that every 'key: value' has a space after the colon.",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("a recipe must be a mapping of sections", file=str(path), line=1)
    lines: dict[str, tuple[str, int | None]] = {}
    if node is not None:
        _line_map(node, "", str(path), lines)
    return data, lines


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in `over` replace; a null technique removes it."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path: Path, seen: tuple[Path, ...] = (),
                     errors: list[PgolfError] | None = None) -> tuple[dict[str, Any], dict]:
    """Read `path` and its bases. Unknown top-level keys are dropped and appended to `errors`
    (raised at once when no list is given) so the rest of the recipe is still checked."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(p.name for p in (*seen, path))
        raise ConfigError(f"recipe inheritance cycle: {chain}", file=str(path), key="base")
    data, lines = read_yaml(path)
    unknown = [k for k in data if k not in TOP_LEVEL]
    found: list[PgolfError] = []
    for key in unknown:
        found.append(ConfigError(
            f"unknown top-level key '{key}'",
            file=str(path),
            line=lines.get(key, (None, None))[1],
            key=key,
            hint=suggest(key, TOP_LEVEL) or f"Valid keys: {', '.join(TOP_LEVEL)}.",
        ))
        del data[key]
    if errors is None:
        raise_collected(found)
    else:
        errors.extend(found)
    base_name = data.pop("base", None)
    if base_name is None:
        return data, lines
    if not isinstance(base_name, str):
        raise ConfigError("'base' must be a recipe file name", file=str(path), line=lines["base"][1], key="base")
    base_path = (path.parent / base_name) if not Path(base_name).is_absolute() else Path(base_name)
    if not base_path.is_file() and (RECIPES_DIR / base_name).is_file():
        base_path = RECIPES_DIR / base_name
    if not base_path.is_file():
        raise ConfigError(
            f"base recipe '{base_name}' not found next to {path.name}",
            file=str(path),
            line=lines["base"][1],
            key="base",
            hint=suggest(base_name, [p.name for p in path.parent.glob("*.yaml")]),
        )
    base_data, base_lines = _load_with_bases(base_path, (*seen, path), errors)
    return merge(base_data, data), {**base_lines, **lines}


def parse_override(text: str) -> tuple[str, Any]:
    """'train.seq_len=256' -> ('train.seq_len', 256); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override '{text}' is not of the form key.path=value",
            file="--set",
            hint="For example: --set train.seq_len=256 or --set techniques.ema.decay=0.99.",
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            if i == 0 and part not in TOP_LEVEL:
                raise ConfigError(
                    f"unknown section '{part}'",
                    file="--set",
                    key=key,
                    hint=suggest(part, TOP_LEVEL) or f"Valid sections: {', '.join(TOP_LEVEL)}.",
                )
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is not a section", file="--set", key=key)
        node = child
    node[parts[-1]] = value


def scale_path(scale: str) -> Path:
    path = SCALES_DIR / f"{scale}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in SCALES_DIR.glob("*.yaml"))
        raise ConfigError(
            f"unknown scale '{scale}'",
            file="--scale",
            hint=suggest(scale, names) or f"Available scales: {', '.join(names)}.",
        )
    return path


def apply_scale(data: dict[str, Any], lines: dict, scale: str) -> dict[str, Any]:
    """Overlay a scale file. Its `techniques:` entries only adjust techniques the recipe enables."""
    overlay, overlay_lines = read_yaml(scale_path(scale))
    tech_overlay = overlay.pop("techniques", None) or {}
    out = merge(data, overlay)
    enabled = out.get("techniques") or {}
    for name, params in tech_overlay.items():
        if name in enabled and isinstance(params, dict):
            current = enabled[name] if isinstance(enabled[name], dict) else {}
            enabled[name] = merge(current, params)
    lines.update({k: v for k, v in overlay_lines.items() if not k.startswith("techniques")})
    out["scale"] = scale
    return out


def flag_overrides(data: Path | str | None, tokenizer: Path | str | None, seed: int | None, steps: int | None,
                   sets: list[str] | tuple[str, ...]) -> list[str]:
    """The run flags (--data, --tokenizer, --seed, --steps, --set) as `key=value` overrides, which
    apply after the scale overlay, so they always win."""
    out: list[str] = []
    if data is not None:
        out.append(f"data.dir={json.dumps(str(data))}")
    if tokenizer is not None:
        out.append(f"data.tokenizer={json.dumps(str(tokenizer))}")
    if seed is not None:
        out.append(f"seed={seed}")
    if steps is not None:
        out += [f"train.iterations={steps}", "train.max_wallclock_seconds=0"]
    return out + list(sets)


def load_recipe(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    scale: str | None = None,
    enable: list[str] | tuple[str, ...] = (),
    technique_check: TechniqueCheck | None = None,
) -> Recipe:
    """Load a recipe file with its bases, an optional scale overlay and `key=value` overrides.

    `enable` names techniques to switch on with their default parameters where the recipe does
    not have them, before the scale overlay, so the overlay's adjustments reach them too (the
    ablation runner's toggles). `technique_check` (`pgolf.registry.technique_problems`) adds the
    techniques' own problems to a failing recipe's, so one error lists them all.
    """
    path = Path(path)
    errors: list[PgolfError] = []  # problems that don't stop loading: all are reported together
    data, lines = _load_with_bases(path, errors=errors)
    if enable:
        techniques = data.get("techniques") or {}
        data["techniques"] = {**techniques, **{name: {} for name in enable if not techniques.get(name)}}
    if scale:
        data = apply_scale(data, lines, scale)
    for text in overrides:
        try:
            key, value = parse_override(text)
            apply_override(data, key, value)
        except ConfigError as exc:
            errors.append(exc)
            continue
        lines[key] = ("--set", None)
    return recipe_from_dict(data, Provenance(lines, default_file=str(path)), default_name=path.stem, errors=errors,
                            technique_check=technique_check)


def recipe_from_dict(data: dict[str, Any], prov: Provenance | None = None, default_name: str = "recipe",
                     errors: list[PgolfError] | None = None, technique_check: TechniqueCheck | None = None) -> Recipe:
    """Build a Recipe, reporting every problem at once (with `errors` found while loading).

    Technique names and parameters are checked by `registry.resolve` when a run starts; when
    the recipe has other problems and a `technique_check` is given they are checked here too.
    """
    prov = prov or Provenance()
    errors = list(errors or [])
    data = dict(data)
    data.pop("base", None)
    techniques = data.pop("techniques", None) or {}
    if not isinstance(techniques, dict):
        errors.append(prov.error("techniques", f"expected a mapping of technique name -> parameters, got {techniques!r}"))
        techniques = {}
    techniques = {name: (params if params is not None else {}) for name, params in techniques.items() if params is not False}
    for name, params in list(techniques.items()):
        if not isinstance(params, dict):
            errors.append(prov.error(f"techniques.{name}", f"expected a mapping of parameters, got {params!r}",
                                     hint="Write 'name: {}' to enable a technique with its default parameters."))
            del techniques[name]
    data.setdefault("name", default_name)
    recipe = None
    try:
        recipe = build_dataclass(Recipe, data, "", prov)
    except ConfigError as exc:
        errors.append(exc)
    if errors:
        errors.extend(technique_check(techniques, prov) if technique_check is not None else [])
        raise_collected(errors)
    assert recipe is not None
    recipe.techniques = techniques
    recipe.provenance = prov
    return recipe


def recipe_summary_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)

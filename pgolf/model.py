"""The challenge's baseline GPT, with the record stack's architecture options.

Parameter names and shapes match train_gpt.py exactly (`tok_emb.weight`,
`blocks.{i}.attn.c_q.weight`, `skip_weights`, ...), so a `final_model.pt` saved by that script
loads with `strict=True`. Options that add parameters (SmearGate) add them only when enabled.

Depth recurrence is expressed as virtual layer lists: the encoder and decoder walk
`encoder_indices` / `decoder_indices` (indices into `blocks`, then `extra_blocks`) when
`looping_active` is set, and the plain halves otherwise. An entry of `extra_blocks` is any
module with the block interface (`forward(x, x0)`, `forward_lanes`, `layer_idx`), e.g. a
repeated pass that shares a block's attention but owns its MLP. Hooks never run in here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import DataError
from pgolf.recipe import ModelConfig

CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights", "smear", "parallel_post_lambdas", "parallel_resid_lambdas",
)
PARALLEL_RESID_INIT = 1.1  # two-lane parallel residuals: each lane keeps 1.1x itself at init (#1529)
SMEAR_WINDOW = 12


class RMSNorm(nn.Module):
    def __init__(self, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),), eps=self.eps)


class CastedLinear(nn.Linear):
    """Weights stay fp32 for the optimizer; the matmul runs in the activation dtype (bf16 on CUDA)."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Rotary(nn.Module):
    """cos/sin tables cached per sequence length."""

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._seq_len_cached = 0
        self._cos_cached: Tensor | None = None
        self._sin_cached: Tensor | None = None

    def tables(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return freqs.cos()[None, None, :, :], freqs.sin()[None, None, :, :]

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            # A compiled graph computes its own tables: filling the cache from inside it would fail the
            # graph's guard (`cache is None`) on the next call and compile the whole model a second time.
            cos, sin = self.tables(seq_len, device)
            return cos.to(dtype=dtype), sin.to(dtype=dtype)
        if self._cos_cached is None or self._seq_len_cached != seq_len or self._cos_cached.device != device:
            self._cos_cached, self._sin_cached = self.tables(seq_len, device)
            self._seq_len_cached = seq_len
        assert self._sin_cached is not None
        return self._cos_cached.to(dtype=dtype), self._sin_cached.to(dtype=dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, xsa: bool = False) -> None:
        super().__init__()
        dim = cfg.model_dim
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.rope_dims = cfg.rope_dims or self.head_dim
        self.xsa = xsa
        kv_dim = self.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, kv_dim, bias=False)
        self.c_v = CastedLinear(dim, kv_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.rope_dims, base=cfg.rope_base)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.rope_dims == self.head_dim:
            return apply_rotary_emb(x, cos, sin)
        rot, rest = x[..., : self.rope_dims], x[..., self.rope_dims :]
        return torch.cat((apply_rotary_emb(rot, cos, sin), rest), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        bsz, seqlen, dim = x.shape
        q = self.c_q(x).reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(seqlen, x.device, q.dtype)
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, is_causal=True, enable_gqa=(self.num_kv_heads != self.num_heads)
        )
        y = y.transpose(1, 2)  # [B, T, H, D]
        if self.xsa:
            y = exclusive_self_attention(y, v.transpose(1, 2))
        return self.proj(y.contiguous().reshape(bsz, seqlen, dim))


def exclusive_self_attention(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along the token's own value vector.

    y: [B, T, H, D]; v: [B, T, Hkv, D]. Heads are grouped over KV heads without repeating v.
    """
    bsz, seqlen, heads, dim = y.shape
    kv_heads = v.size(2)
    yg = y.reshape(bsz, seqlen, kv_heads, heads // kv_heads, dim)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    yg = yg - (yg * vn).sum(-1, keepdim=True) * vn
    return yg.reshape(bsz, seqlen, heads, dim)


class MLP(nn.Module):
    """relu² (baseline) or leaky_relu(0.5)² (record stack)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True
        self.leaky_slope = cfg.leaky_slope if cfg.activation == "leaky_relu2" else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = torch.relu(h) if self.leaky_slope is None else F.leaky_relu(h, self.leaky_slope)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        dim = cfg.model_dim
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm()
        self.mlp_norm = RMSNorm()
        self.attn = CausalSelfAttention(cfg, xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        self.parallel = cfg.parallel_variant == "sum" and 0 <= cfg.parallel_start_layer <= layer_idx

    def mix_input(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(dtype=x.dtype)
        return mix[0][None, None, :] * x + mix[1][None, None, :] * x0

    def attn_branch(self, x: Tensor) -> Tensor:
        return self.attn_scale.to(dtype=x.dtype)[None, None, :] * self.attn(self.attn_norm(x) * self.norm_scale)

    def mlp_branch(self, x: Tensor, mlp: nn.Module | None = None) -> Tensor:
        """`mlp` replaces this block's MLP for one call (an untied repeated pass of depth recurrence)."""
        mlp = self.mlp if mlp is None else mlp
        return self.mlp_scale.to(dtype=x.dtype)[None, None, :] * mlp(self.mlp_norm(x) * self.norm_scale)

    def forward(self, x: Tensor, x0: Tensor, mlp: nn.Module | None = None) -> Tensor:
        x = self.mix_input(x, x0)
        if self.parallel:
            return x + self.attn_branch(x) + self.mlp_branch(x, mlp)
        x = x + self.attn_branch(x)
        return x + self.mlp_branch(x, mlp)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, post: Tensor, resid: Tensor,
                      mlp: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Two-lane parallel residual: attention reads lane 0 (mixed with x0), the MLP reads lane 1,
        and each writes into both lanes with learned weights ``post[branch, lane]``."""
        post, resid = post.to(dtype=lane0.dtype), resid.to(dtype=lane0.dtype)
        attn_out = self.attn_branch(self.mix_input(lane0, x0))
        mlp_out = self.mlp_branch(lane1, mlp)
        new0 = resid[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out
        new1 = resid[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out
        return new0, new1


class SmearGate(nn.Module):
    """x_t += lam * sigmoid(w . x_t[:12]) * x_{t-1}; identity at init; masked at BOS (the record fix)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.smear_gate_w = nn.Parameter(torch.zeros(1, min(SMEAR_WINDOW, dim)))
        self.smear_lambda = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, not_bos: Tensor | None) -> Tensor:
        gate = torch.sigmoid(F.linear(x[..., : self.smear_gate_w.size(1)], self.smear_gate_w.to(x.dtype)))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        term = self.smear_lambda.to(x.dtype) * gate * prev
        if not_bos is not None:
            term = term * not_bos.unsqueeze(-1).to(x.dtype)
        return x + term


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, bos_id: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.bos_id = bos_id
        self.tie_embeddings = cfg.tie_embeddings
        self.logit_softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.num_encoder_layers = cfg.num_layers // 2
        self.num_decoder_layers = cfg.num_layers - self.num_encoder_layers
        self.num_skip_weights = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skip_weights, cfg.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.extra_blocks = nn.ModuleList()  # per-pass copies added by depth recurrence
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
        self.lane_start = cfg.parallel_start_layer if cfg.parallel_variant == "two_lane" else -1
        self.parallel_post_lambdas: nn.Parameter | None = None
        self.parallel_resid_lambdas: nn.Parameter | None = None
        if self.lane_start >= 0:
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2, dtype=torch.float32))
            self.parallel_resid_lambdas = nn.Parameter(
                torch.full((cfg.num_layers, 2), PARALLEL_RESID_INIT, dtype=torch.float32))
        self.final_norm = RMSNorm()
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        self.encoder_indices: list[int] = list(range(self.num_encoder_layers))
        self.decoder_indices: list[int] = list(range(self.num_encoder_layers, cfg.num_layers))
        self.looping_active = False
        self.register_buffer("loss_weights", None, persistent=False)
        self._init_weights(cfg.tied_embed_init_std)

    def _init_weights(self, tied_embed_init_std: float) -> None:
        if self.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def block(self, index: int) -> nn.Module:
        n = len(self.blocks)
        return self.blocks[index] if index < n else self.extra_blocks[index - n]

    def layer_plan(self) -> tuple[list[int], list[int]]:
        """The (encoder, decoder) block sequence this forward will walk."""
        if self.looping_active:
            return self.encoder_indices, self.decoder_indices
        return list(range(self.num_encoder_layers)), list(range(self.num_encoder_layers, len(self.blocks)))

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings, smeared with the previous token when SmearGate is on (never across a BOS
        unless the fix is off)."""
        x = self.tok_emb(input_ids)
        if self.smear is not None:
            x = self.smear(x, (input_ids != self.bos_id) if self.cfg.smear_bos_fix else None)
        return x

    def forward_hidden(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        x0 = x
        skips: list[Tensor] = []
        encoder, decoder = self.layer_plan()
        for i in encoder:
            x = self.block(i)(x, x0)
            skips.append(x)
        lanes: tuple[Tensor, Tensor] | None = None
        for j, i in enumerate(decoder):
            block = self.block(i)
            if lanes is None and 0 <= self.lane_start <= block.layer_idx:
                lanes = (x, x)  # two lanes from the first decoder block at or past the start layer on
            skip = self.skip_weights[j].to(dtype=x.dtype)[None, None, :] * skips.pop() \
                if skips and j < self.skip_weights.size(0) else None
            if lanes is None:
                x = block(x if skip is None else x + skip, x0)
                continue
            assert self.parallel_post_lambdas is not None and self.parallel_resid_lambdas is not None
            lane0 = lanes[0] if skip is None else lanes[0] + skip
            lanes = block.forward_lanes(lane0, lanes[1], x0, self.parallel_post_lambdas[block.layer_idx],
                                        self.parallel_resid_lambdas[block.layer_idx])
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return self.final_norm(x)

    def logits(self, hidden: Tensor, head_delta: Tensor | None = None) -> Tensor:
        """Soft-capped logits; `head_delta` is added before the cap (a LoRA on the output head)."""
        if self.tie_embeddings:
            proj = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        else:
            assert self.lm_head is not None
            proj = self.lm_head(hidden)
        if head_delta is not None:
            proj = proj + head_delta
        return self.logit_softcap * torch.tanh(proj / self.logit_softcap)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Mean training loss; per-token weights (frequency weighting) when `loss_weights` is set."""
        logits = self.logits(self.forward_hidden(input_ids)).reshape(-1, self.tok_emb.num_embeddings)
        targets = target_ids.reshape(-1)
        if self.loss_weights is None:
            return F.cross_entropy(logits.float(), targets, reduction="mean")
        ce = F.cross_entropy(logits.float(), targets, reduction="none")
        w = self.loss_weights[targets]
        return (ce * w).sum() / w.sum()

    def token_nll(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        """Per-token NLL in nats, shape like `target_ids` (evaluation is never weighted)."""
        logits = self.logits(self.forward_hidden(input_ids))
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none")
        return nll.reshape(target_ids.shape)

    def log_probs(self, input_ids: Tensor) -> Tensor:
        """Full next-token log-distributions [B, T, V] (audits and mixers)."""
        return torch.log_softmax(self.logits(self.forward_hidden(input_ids)).float(), dim=-1)


def build_model(cfg: ModelConfig, bos_id: int = 1) -> GPT:
    return GPT(cfg, bos_id=bos_id)


def prepare_for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """CUDA: bf16 body with fp32 CastedLinear weights and control params (as the challenge). CPU: fp32."""
    model = model.to(device)
    if device.type != "cuda":
        return model.float()
    model = model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (param.ndim < 2 or any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS)) and param.dtype != torch.float32:
                param.data = param.data.float()
    return model


def model_fields_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """ModelConfig fields from a challenge-style state dict (tok_emb, blocks.{i}.attn.c_q, ...)."""
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


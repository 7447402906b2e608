"""The challenge's baseline GPT, with the record stack's architecture options.

Parameter names and shapes match train_gpt.py exactly (`tok_emb.weight`,
`blocks.{i}.attn.c_q.weight`, `skip_weights`, ...), so a `final_model.pt` saved by that script
loads with `strict=True`. Options that add parameters (SmearGate, skip and attention gates) add
them only when enabled.

Depth recurrence is expressed as virtual layer lists: the encoder and decoder walk
`encoder_indices` / `decoder_indices` (indices into `blocks`, then `extra_blocks`) when
`looping_active` is set, and the plain halves otherwise. An entry of `extra_blocks` is any
module with the block interface (`forward(x, x0)`, `forward_lanes`, `layer_idx`), e.g. a
repeated pass that shares a block's attention but owns its MLP. Hooks never run in here.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import DataError
from pgolf.recipe import ModelConfig

CONTROL_TENSOR_NAME_PATTERNS = (
    "attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
    "q_gain", "skip_weight", "skip_weights", "smear", "parallel_post_lambdas", "parallel_resid_lambdas",
    "skip_gates", "attn_gate_proj", "attn_gate_w",  # gates: scalar AdamW, kept float (#1667/#1736/#1787 lists)
)
PARALLEL_RESID_INIT = 1.1  # two-lane parallel residuals: each lane keeps 1.1x itself at init (#1529)
# Trained by no training optimizer: AsymLogit's softcaps only act in the eval path (#1923).
TRAIN_FROZEN_PARAMETERS = ("softcap_pos", "softcap_neg")
ORTHOGONAL_MIN_DIM = 64  # the records' orthogonal init takes the 2-D Linear weights with both dims >= 64
# BigramHash (#1019/#1060): odd multipliers of the current and previous token, XORed, modulo the
# buckets but the last, which every row's first position gets; learned output scale starts at 0.05.
BIGRAM_HASH_CUR, BIGRAM_HASH_PREV = 36313, 27191
BIGRAM_SCALE_INIT = 0.05
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
        self.gate, self.gate_src, self.gate_scale = cfg.attn_gate, cfg.attn_gate_src, cfg.attn_gate_scale
        if cfg.attn_gate == "output":
            self.attn_gate_proj = CastedLinear(cfg.attn_gate_window, cfg.num_heads, bias=False)
            self.attn_gate_proj._zero_init = True  # 2 * sigmoid(0) = 1: identity at init
        elif cfg.attn_gate in ("sparse", "dense"):
            width = dim if cfg.attn_gate == "dense" else cfg.attn_gate_window
            gate_w = torch.zeros(cfg.num_heads, width, dtype=torch.float32)  # sigmoid(0) = 0.5 at init
            if cfg.attn_gate_init_std > 0:
                nn.init.normal_(gate_w, mean=0.0, std=cfg.attn_gate_init_std)
            self.attn_gate_w = nn.Parameter(gate_w)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if self.rope_dims == self.head_dim:
            return apply_rotary_emb(x, cos, sin)
        rot, rest = x[..., : self.rope_dims], x[..., self.rope_dims :]
        return torch.cat((apply_rotary_emb(rot, cos, sin), rest), dim=-1)

    def forward(self, x: Tensor, doc: DocumentLayout | None = None) -> Tensor:
        bsz, seqlen, dim = x.shape
        q_raw = self.c_q(x)  # the output gate's `q` source: projected, before RoPE and norm
        q = q_raw.reshape(bsz, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(bsz, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = F.rms_norm(q, (q.size(-1),))
        k = F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(seqlen, x.device, q.dtype)
        q = self._rope(q, cos, sin)
        k = self._rope(k, cos, sin)
        q = q * self.q_gain.to(dtype=q.dtype)[None, :, None, None]
        if doc is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None, is_causal=True, enable_gqa=(self.num_kv_heads != self.num_heads)
            )
        else:
            y = document_attention(q, k, v, doc)
        y = y.transpose(1, 2)  # [B, T, H, D]
        if self.xsa:
            y = exclusive_self_attention(y, v.transpose(1, 2))
        if self.gate != "none":
            y = self.gate_heads(y, x, q_raw)
        return self.proj(y.contiguous().reshape(bsz, seqlen, dim))

    def gate_heads(self, y: Tensor, x: Tensor, q_raw: Tensor) -> Tensor:
        """The configured head gate on y [B, T, H, D]; `x` is this attention's (normed) input."""
        if self.gate == "output":
            return head_gate(y, q_raw if self.gate_src == "q" else x, self.attn_gate_proj.weight, peak=2.0)
        return head_gate(y, x, self.attn_gate_w, scale=self.gate_scale)


def head_gate(y: Tensor, src: Tensor, weight: Tensor, scale: float = 1.0, peak: float = 1.0) -> Tensor:
    """Scale each head of y [B, T, H, D] by peak * sigmoid(scale * W . src[..., :in]) with W [H, in].

    The records' three attention output gates: sparse (#1787: in = 12, scale 0.5 or 1), output
    (#1667: in = 12, peak 2, so identity at W = 0) and dense (#1736: in = model_dim).
    """
    g = torch.sigmoid(scale * F.linear(src[..., : weight.size(1)], weight.to(src.dtype)))
    return y * (peak * g)[..., None]


# --- document isolation (#1530 VarLen): attention never crosses a BOS ----------------------------------


class DocumentLayout(NamedTuple):
    """Which keys each query may see under document isolation, built once per forward from the input ids.

    Queries are taken in blocks of `block` positions. No segment is longer than a block, so a block's
    keys lie in it and the block before it: `mask` [B * T / block, 1, block, keys] (bool, keys = 2 *
    block, or block when a row is a single block) allows a key of the query's own segment at or before
    it. `cu_seqlens` and `max_seqlen` describe the same segments to flash-attn's varlen kernel, the
    records' path (eager CUDA with flash-attn installed; `mask` is then None).
    """

    block: int
    mask: Tensor | None
    cu_seqlens: Tensor | None = None
    max_seqlen: int = 0


@functools.cache
def flash_varlen() -> Callable[..., Any] | None:
    """flash-attn's `flash_attn_varlen_func` (FA3's interface first, as the records), or None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module).flash_attn_varlen_func
        except Exception:  # not installed, or built for another torch / GPU
            continue
    return None


def segment_starts(input_ids: Tensor, bos_id: int, max_doc_len: int = 0) -> Tensor:
    """[B, T] bool: where an attention segment starts. A document starts at its BOS, and the row start
    opens a segment too (the document there began before the row). With `max_doc_len` > 0 a document is
    also cut every `max_doc_len` tokens from its start, as the records' `_build_cu_seqlens`."""
    pos = torch.arange(input_ids.size(-1), device=input_ids.device)
    doc_start = (input_ids == bos_id) | (pos == 0)
    if max_doc_len <= 0:
        return doc_start
    last_start = torch.cummax(torch.where(doc_start, pos, torch.zeros_like(pos)), dim=-1).values
    return (pos - last_start) % max_doc_len == 0


def query_block(seq_len: int, max_doc_len: int) -> int:
    """Queries per attention block: `max_doc_len` when it bounds the segments of a longer row, else the row."""
    return max_doc_len if 0 < max_doc_len < seq_len and seq_len % max_doc_len == 0 else seq_len


def document_mask(starts: Tensor, block: int) -> Tensor:
    """The block-local document-causal mask (see `DocumentLayout`) from segment starts [B, T]."""
    seg = starts.long().cumsum(-1)  # segment number within the row, from 1
    bsz, seq_len = seg.shape
    blocks = seq_len // block
    q_seg = seg.reshape(bsz * blocks, block)
    ones = torch.ones(block, block * min(blocks, 2), dtype=torch.bool, device=seg.device)
    if blocks == 1:
        return ((q_seg[:, :, None] == q_seg[:, None, :]) & ones.tril())[:, None]
    per_block = seg.reshape(bsz, blocks, block)
    prev = F.pad(per_block[:, :-1], (0, 0, 1, 0), value=-1)  # no segment before the first block
    k_seg = torch.cat((prev, per_block), dim=-1).reshape(bsz * blocks, 2 * block)
    return ((q_seg[:, :, None] == k_seg[:, None, :]) & ones.tril(diagonal=block))[:, None]


def varlen_offsets(starts: Tensor) -> tuple[Tensor, int]:
    """Segment starts [B, T] as flash-attn's int32 `cu_seqlens` over the flattened batch, and the longest segment."""
    flat = starts.reshape(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    bounds = torch.cat((flat.nonzero().squeeze(1), end)).to(torch.int32)
    return bounds, int((bounds[1:] - bounds[:-1]).max())


def document_layout(input_ids: Tensor, bos_id: int, max_doc_len: int = 0) -> DocumentLayout:
    """The attention layout of a batch [B, T] under document isolation (see `segment_starts`)."""
    starts = segment_starts(input_ids, bos_id, max_doc_len)
    block = query_block(input_ids.size(-1), max_doc_len)
    if input_ids.is_cuda and not torch.compiler.is_compiling() and flash_varlen() is not None:
        cu_seqlens, longest = varlen_offsets(starts)
        return DocumentLayout(block, None, cu_seqlens, longest)
    return DocumentLayout(block, document_mask(starts, block))


def document_attention(q: Tensor, k: Tensor, v: Tensor, doc: DocumentLayout) -> Tensor:
    """Causal attention inside document segments: q [B, H, T, D], k and v [B, Hkv, T, D] -> [B, H, T, D]."""
    bsz, heads, seq_len, dim = q.shape
    kv_heads = k.size(1)
    if doc.cu_seqlens is not None:
        flash = flash_varlen()
        assert flash is not None
        flat = [t.transpose(1, 2).reshape(bsz * seq_len, t.size(1), dim) for t in (q, k, v)]
        out = flash(*flat, cu_seqlens_q=doc.cu_seqlens, cu_seqlens_k=doc.cu_seqlens, max_seqlen_q=doc.max_seqlen,
                    max_seqlen_k=doc.max_seqlen, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # FA3 builds differ in returning the LSE too
        return out.reshape(bsz, seq_len, heads, dim).transpose(1, 2)
    gqa = kv_heads != heads
    blocks = seq_len // doc.block
    if blocks == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=doc.mask, enable_gqa=gqa)
    block = doc.block

    def with_previous_block(t: Tensor) -> Tensor:  # [B, Hkv, T, D] -> [B * blocks, Hkv, 2 * block, D]
        tb = t.reshape(bsz, kv_heads, blocks, block, dim).transpose(1, 2)
        prev = F.pad(tb[:, :-1], (0, 0, 0, 0, 0, 0, 1, 0))
        return torch.cat((prev, tb), dim=3).reshape(bsz * blocks, kv_heads, 2 * block, dim)

    qb = q.reshape(bsz, heads, blocks, block, dim).transpose(1, 2).reshape(bsz * blocks, heads, block, dim)
    y = F.scaled_dot_product_attention(qb, with_previous_block(k), with_previous_block(v), attn_mask=doc.mask,
                                       enable_gqa=gqa)
    return y.reshape(bsz, blocks, heads, block, dim).transpose(1, 2).reshape(bsz, heads, seq_len, dim)


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

    def attn_branch(self, x: Tensor, doc: DocumentLayout | None = None) -> Tensor:
        return self.attn_scale.to(dtype=x.dtype)[None, None, :] * self.attn(self.attn_norm(x) * self.norm_scale, doc)

    def mlp_branch(self, x: Tensor, mlp: nn.Module | None = None) -> Tensor:
        """`mlp` replaces this block's MLP for one call (an untied repeated pass of depth recurrence)."""
        mlp = self.mlp if mlp is None else mlp
        return self.mlp_scale.to(dtype=x.dtype)[None, None, :] * mlp(self.mlp_norm(x) * self.norm_scale)

    def forward(self, x: Tensor, x0: Tensor, mlp: nn.Module | None = None,
                doc: DocumentLayout | None = None) -> Tensor:
        x = self.mix_input(x, x0)
        if self.parallel:
            return x + self.attn_branch(x, doc) + self.mlp_branch(x, mlp)
        x = x + self.attn_branch(x, doc)
        return x + self.mlp_branch(x, mlp)

    def forward_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, post: Tensor, resid: Tensor,
                      mlp: nn.Module | None = None, doc: DocumentLayout | None = None) -> tuple[Tensor, Tensor]:
        """Two-lane parallel residual: attention reads lane 0 (mixed with x0), the MLP reads lane 1,
        and each writes into both lanes with learned weights ``post[branch, lane]``."""
        post, resid = post.to(dtype=lane0.dtype), resid.to(dtype=lane0.dtype)
        attn_out = self.attn_branch(self.mix_input(lane0, x0), doc)
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


def bigram_hash(tokens: Tensor, buckets: int) -> Tensor:
    """Bucket of each (previous, current) token pair along the last dim, in int32 arithmetic as the
    records (products wrap past 2^31); position 0 of every row has no previous token in the row and
    gets the reserved bucket `buckets - 1`. No BOS special case: the pair across a document
    boundary is hashed like any other, as in the records."""
    t = tokens.to(torch.int32)
    reserved = buckets - 1
    pairs = torch.bitwise_xor(t[..., 1:] * BIGRAM_HASH_CUR, t[..., :-1] * BIGRAM_HASH_PREV).remainder(reserved)
    return torch.cat((torch.full_like(t[..., :1], reserved), pairs), dim=-1).long()


class BigramHash(nn.Module):
    """scale * proj(embed[hash(prev, cur)]), added to the token embedding (input side only).

    The table starts at zero; the projection is orthogonal (the records zero it on construction,
    but their model-wide init pass then makes it orthogonal: a zero table behind a zero projection
    would never receive a gradient). No projection when the table is model_dim wide.
    """

    def __init__(self, buckets: int, dim: int, model_dim: int) -> None:
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim, bias=False) if dim != model_dim else None
        if self.proj is not None:
            self.proj._orthogonal_init = True
        self.scale = nn.Parameter(torch.tensor(BIGRAM_SCALE_INIT, dtype=torch.float32))

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(bigram_hash(input_ids, self.buckets))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(dtype=h.dtype)


def softcap(logits: Tensor, cap: float | Tensor) -> Tensor:
    return cap * torch.tanh(logits / cap)


def asym_softcap(logits: Tensor, cap_pos: Tensor, cap_neg: Tensor) -> Tensor:
    """AsymLogit (#1923): positive logits capped by `cap_pos`, the rest by `cap_neg`."""
    cap_pos, cap_neg = cap_pos.to(logits.dtype), cap_neg.to(logits.dtype)
    return torch.where(logits > 0, softcap(logits, cap_pos), softcap(logits, cap_neg))


def orthogonal_init_targets(model: GPT, all_large: bool) -> list[nn.Linear]:
    """The Linear modules to initialise orthogonally, in the records' draw order (#1855 `_init_weights`).

    With `all_large`: each layer's q, k, v, then each layer's MLP up projection (the records' banks,
    whatever their size), then every other Linear with both dims >= 64 that is not zero-initialised,
    in module order. Otherwise only modules that ask for it (`_orthogonal_init`). Output projections
    stay zero (`_zero_init`).
    """
    banks: list[nn.Linear] = []
    if all_large:
        banks = [m for b in model.blocks for m in (b.attn.c_q, b.attn.c_k, b.attn.c_v)]
        banks += [b.mlp.fc for b in model.blocks]
    taken = {id(m) for m in banks}
    rest = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in taken
            and not getattr(m, "_zero_init", False) and min(m.weight.shape) >= ORTHOGONAL_MIN_DIM
            and (all_large or getattr(m, "_orthogonal_init", False))]
    return banks + rest


def unet_skip(x: Tensor, skip: Tensor, weight: Tensor, gate: Tensor | None = None) -> Tensor:
    """x + w * skip (the baseline), or with a gate lerp(w * skip, x, sigmoid(g)) = s * x + (1 - s) * w * skip
    (#1493 and later, in both the one-lane and the two-lane decoder). weight, gate: [dim]."""
    scaled = weight.to(dtype=x.dtype)[None, None, :] * skip
    if gate is None:
        return x + scaled
    return torch.lerp(scaled, x, torch.sigmoid(gate.to(dtype=x.dtype))[None, None, :])


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
        self.skip_gates: nn.Parameter | None = None  # sigmoid(0) = 0.5: each skip starts as an even mix
        if cfg.skip_gates:
            self.skip_gates = nn.Parameter(torch.zeros(self.num_skip_weights, cfg.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.extra_blocks = nn.ModuleList()  # per-pass copies added by depth recurrence
        self.smear = SmearGate(cfg.model_dim) if cfg.smear_gate else None
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim) if cfg.bigram_vocab_size else None
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
        self.softcap_pos: nn.Parameter | None = None  # AsymLogit: start at the softcap (identity at init)
        self.softcap_neg: nn.Parameter | None = None
        if cfg.asym_logit:
            self.softcap_pos = nn.Parameter(torch.tensor(float(cfg.logit_softcap), dtype=torch.float32))
            self.softcap_neg = nn.Parameter(torch.tensor(float(cfg.logit_softcap), dtype=torch.float32))
        self._init_weights(cfg.tied_embed_init_std)

    def _init_weights(self, tied_embed_init_std: float) -> None:
        if self.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=tied_embed_init_std)
        for module in self.modules():
            if isinstance(module, nn.Linear) and getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
        for module in orthogonal_init_targets(self, self.cfg.orthogonal_init):
            nn.init.orthogonal_(module.weight, gain=1.0)

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
        if self.bigram is not None:
            x = x + self.bigram(input_ids)
        if self.smear is not None:
            x = self.smear(x, (input_ids != self.bos_id) if self.cfg.smear_bos_fix else None)
        return x

    def forward_hidden(self, input_ids: Tensor, max_doc_len: int = 0) -> Tensor:
        """Final hidden states [B, T, dim]. Under document isolation no position attends across a BOS or
        a row start, and `max_doc_len` > 0 also cuts documents into pieces of at most that many tokens
        (training's packed rows; see `document_layout`)."""
        doc = document_layout(input_ids, self.bos_id, max_doc_len) if self.cfg.doc_isolation else None
        x = self.embed(input_ids)
        x = F.rms_norm(x, (x.size(-1),))
        x0 = x
        skips: list[Tensor] = []
        encoder, decoder = self.layer_plan()
        for i in encoder:
            x = self.block(i)(x, x0, doc=doc)
            skips.append(x)
        lanes: tuple[Tensor, Tensor] | None = None
        for j, i in enumerate(decoder):
            block = self.block(i)
            if lanes is None and 0 <= self.lane_start <= block.layer_idx:
                lanes = (x, x)  # two lanes from the first decoder block at or past the start layer on
            skip = skips.pop() if skips and j < self.skip_weights.size(0) else None
            if lanes is None:
                x = block(x if skip is None else self.mix_skip(j, x, skip), x0, doc=doc)
                continue
            assert self.parallel_post_lambdas is not None and self.parallel_resid_lambdas is not None
            lane0 = lanes[0] if skip is None else self.mix_skip(j, lanes[0], skip)  # skips join attention's lane
            lanes = block.forward_lanes(lane0, lanes[1], x0, self.parallel_post_lambdas[block.layer_idx],
                                        self.parallel_resid_lambdas[block.layer_idx], doc=doc)
        if lanes is not None:
            x = 0.5 * (lanes[0] + lanes[1])
        return self.final_norm(x)

    def mix_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        """The j-th decoder step's U-Net skip mixed into x (gated when skip gates are on)."""
        gate = None if self.skip_gates is None else self.skip_gates[j]
        return unet_skip(x, skip, self.skip_weights[j], gate)

    def grow_skips(self, count: int) -> None:
        """Room for `count` skips (a longer virtual U-Net under depth recurrence): new weights 1, new gates 0."""
        old = self.skip_weights
        if count <= old.size(0):
            return
        weights = torch.ones(count, old.size(1), dtype=old.dtype, device=old.device)
        weights[: old.size(0)] = old.detach()
        self.skip_weights = nn.Parameter(weights)
        if self.skip_gates is not None:
            gates = torch.zeros_like(weights, dtype=self.skip_gates.dtype)
            gates[: old.size(0)] = self.skip_gates.detach()
            self.skip_gates = nn.Parameter(gates)
        self.num_skip_weights = count

    def logits(self, hidden: Tensor, head_delta: Tensor | None = None) -> Tensor:
        """Soft-capped logits for scoring; `head_delta` is added before the cap (a LoRA on the output head).
        AsymLogit's two caps apply here, never in the training loss (`forward`), as in #1923."""
        proj = self.head(hidden, head_delta)
        if self.softcap_pos is not None and self.softcap_neg is not None:
            return asym_softcap(proj, self.softcap_pos, self.softcap_neg)
        return softcap(proj, self.logit_softcap)

    def head(self, hidden: Tensor, head_delta: Tensor | None = None) -> Tensor:
        """Output-head projection before the softcap."""
        if self.tie_embeddings:
            proj = F.linear(hidden, self.tok_emb.weight.to(hidden.dtype))
        else:
            assert self.lm_head is not None
            proj = self.lm_head(hidden)
        if head_delta is not None:
            proj = proj + head_delta
        return proj

    def forward(self, input_ids: Tensor, target_ids: Tensor, max_doc_len: int = 0) -> Tensor:
        """Mean training loss; per-token weights (frequency weighting) when `loss_weights` is set.
        Always the plain softcap (the records' training path, fused or not, ignores AsymLogit's caps).
        `max_doc_len`: see `forward_hidden` (the loop's packed rows under document isolation)."""
        logits = softcap(self.head(self.forward_hidden(input_ids, max_doc_len)), self.logit_softcap)
        logits = logits.reshape(-1, self.tok_emb.num_embeddings)
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
            "smear_gate": any(k.startswith("smear.") for k in state), **gate_fields_from_state(state, int(dim)),
            "asym_logit": "softcap_pos" in state, **bigram_fields_from_state(state)}


def bigram_fields_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """BigramHash's bucket count and width from its table (absent: off)."""
    table = state.get("bigram.embed.weight")
    return {} if table is None else {"bigram_vocab_size": int(table.shape[0]), "bigram_dim": int(table.shape[1])}


def gate_fields_from_state(state: dict[str, Tensor], dim: int) -> dict[str, Any]:
    """Skip and attention gate fields from their tensors. The sparse gate's scale is not stored: a
    checkpoint trained with SPARSE_ATTN_GATE_SCALE=0.5 (#1855 on) also needs model.attn_gate_scale=0.5."""
    fields: dict[str, Any] = {"skip_gates": "skip_gates" in state}
    if "blocks.0.attn.attn_gate_proj.weight" in state:
        fields.update(attn_gate="output", attn_gate_window=int(state["blocks.0.attn.attn_gate_proj.weight"].shape[1]))
    elif "blocks.0.attn.attn_gate_w" in state:
        width = int(state["blocks.0.attn.attn_gate_w"].shape[1])
        fields["attn_gate"] = "dense" if width == dim else "sparse"
        if width != dim:
            fields["attn_gate_window"] = width
    return fields


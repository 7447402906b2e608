"""Muon (Newton-Schulz orthogonalised momentum) for block matrices, Adam for the rest.

Faithful to train_gpt.py: 5 Newton-Schulz steps with (3.4445, -4.7750, 2.0315), Nesterov
momentum, the `max(1, rows/cols)**0.5` scale, and the work split round-robin over ranks with
one all-reduce of the flattened updates. Options from the record stack: decoupled weight decay
(``p *= 1 - lr*wd``, optionally tapered late in training), MuonEq-R (each row of the update
normalised before Newton-Schulz) and Polar Express's per-iteration coefficients.
On CPU the iteration runs in float32 (bf16 matmuls are ~100x slower there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf.errors import ConfigError
from pgolf.model import CONTROL_TENSOR_NAME_PATTERNS, TRAIN_FROZEN_PARAMETERS
from pgolf.recipe import OptimConfig

NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (PR #1344, as used by #1787 on): one minimax-optimal (a, b, c) per iteration, for at
# most five iterations. Figures from #1787's train_gpt.py, `_PE_COEFFS`.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_TABLES = {"default": None, "polar_express": POLAR_EXPRESS_COEFFS}  # None: NS_COEFFS at every step


def newton_schulz_coefficients(kind: str, steps: int) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations. A per-iteration table has no entry past its
    end, so asking for more steps than it holds is an error rather than a silent cut."""
    table = NS_TABLES[kind]
    if table is None:
        return [NS_COEFFS] * steps
    if steps > len(table):
        raise ConfigError(f"muon_backend_steps is {steps}, but the {kind} Newton-Schulz table holds "
                          f"{len(table)} iterations (expected at most {len(table)})", key="optim.muon_backend_steps",
                          hint=f"Set optim.muon_backend_steps to {len(table)} (the records' value) or fewer.")
    return list(table[:steps])


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 10, eps: float = 1e-7,
                                coefficients: list[tuple[float, float, float]] | None = None) -> Tensor:
    """Approximately orthogonalise a 2-D update (bf16 on CUDA, fp32 elsewhere): X <- aX + (bA + cA^2)X
    with A = XX^T, one (a, b, c) per iteration (default: the baseline's tuple `steps` times)."""
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for a, b, c in coefficients if coefficients is not None else [NS_COEFFS] * steps:
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        momentum: float,
        backend_steps: int,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        row_normalize: bool = False,
        ns_coefficients: str = "default",
    ) -> None:
        newton_schulz_coefficients(ns_coefficients, backend_steps)  # a table too short fails here, not mid-run
        defaults = dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                        weight_decay=weight_decay, row_normalize=row_normalize, ns_coefficients=ns_coefficients)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            coefficients = newton_schulz_coefficients(group["ns_coefficients"], group["backend_steps"])
            update_dtype = torch.bfloat16 if params[0].is_cuda else torch.float32
            total = sum(int(p.numel()) for p in params)
            updates_flat = torch.zeros(total, device=params[0].device, dtype=update_dtype)
            curr = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    g = p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=momentum)
                    if group["row_normalize"]:
                        g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
                    g = zeropower_via_newtonschulz5(g, coefficients=coefficients)
                    g = g * max(1, g.size(0) / g.size(1)) ** 0.5
                    updates_flat[curr : curr + p.numel()] = g.reshape(-1)
                curr += p.numel()
            if distributed:
                dist.all_reduce(updates_flat, op=dist.ReduceOp.SUM)
            curr = 0
            wd = group["weight_decay"]
            for p in params:
                g = updates_flat[curr : curr + p.numel()].view_as(p).to(dtype=p.dtype)
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(g, alpha=-lr)
                curr += p.numel()
        return loss


def _adam(params: list[Tensor], lr: float, cfg: OptimConfig, weight_decay: float) -> torch.optim.Optimizer:
    fused = bool(params) and params[0].is_cuda
    cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    kwargs = {"weight_decay": weight_decay} if weight_decay else {}
    return cls([{"params": params, "lr": lr, "base_lr": lr}], betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
               fused=fused, **kwargs)


def split_parameters(model: nn.Module) -> dict[str, list[Tensor]]:
    """The baseline's split: block matrices -> Muon; embedding, head, everything else -> Adam."""
    groups: dict[str, list[Tensor]] = {"matrix": [], "scalar": [], "token": [], "head": []}
    for name, p in model.named_parameters():
        if name in TRAIN_FROZEN_PARAMETERS:
            continue  # trained only after training (test-time passes), never by these optimizers
        if name in ("tok_emb.weight", "bigram.embed.weight"):  # BigramHash's table: the token rate (#1019/#1060)
            groups["token"].append(p)
        elif name == "lm_head.weight":
            groups["head"].append(p)
        elif (name.startswith(("blocks.", "extra_blocks.")) and p.ndim == 2
              and not any(pat in name for pat in CONTROL_TENSOR_NAME_PATTERNS)):
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    return groups


def build_optimizers(model: nn.Module, cfg: OptimConfig, tie_embeddings: bool) -> list[torch.optim.Optimizer]:
    groups = split_parameters(model)
    token_lr = cfg.tied_embed_lr if tie_embeddings else cfg.embed_lr
    muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_weight_decay, row_normalize=cfg.muon_row_normalize,
                ns_coefficients=cfg.muon_ns_coefficients)
    for group in muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    optimizers: list[torch.optim.Optimizer] = [_adam(groups["token"], token_lr, cfg, cfg.embed_weight_decay), muon,
                                               _adam(groups["scalar"], cfg.scalar_lr, cfg, cfg.adam_weight_decay)]
    if groups["head"]:
        optimizers.insert(1, _adam(groups["head"], cfg.head_lr, cfg, cfg.adam_weight_decay))
    return optimizers


def muon_momentum_at(step: int, cfg: OptimConfig) -> float:
    """Linear momentum warmup from `muon_momentum_warmup_start` over the first steps."""
    if cfg.muon_momentum_warmup_steps <= 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def weight_decay_taper(frac: float, start_frac: float, final_mult: float) -> float:
    """The weight-decay multiplier of #1729: 1 until `start_frac` of training, then linear to
    `final_mult` at the end (`frac` is the elapsed fraction, as for the LR schedule)."""
    if frac <= start_frac or start_frac >= 1.0:
        return 1.0
    progress = min(max((frac - start_frac) / (1.0 - start_frac), 0.0), 1.0)
    return 1.0 + (final_mult - 1.0) * progress


def muon_weight_decay_at(frac: float, cfg: OptimConfig) -> float:
    """Muon's decoupled weight decay at elapsed fraction `frac` (tapered when configured)."""
    return cfg.muon_weight_decay * weight_decay_taper(frac, cfg.muon_wd_taper_start_frac, cfg.muon_wd_taper_final_mult)

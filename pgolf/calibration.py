"""Calibration statistics shared by export techniques: the inputs' second moments per layer.

GPTQ quantizes a matrix against the Hessian ``E[XᵀX]`` of its inputs; SDClip's Hessian-aware
variant and frequency weighting's Hessian mode use the same statistics. The host collects them
once per export (`pgolf.services`) from the batches the calibration provider supplies, so every
technique sees the same numbers without reaching into another technique.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

TIED_EMBEDDING = "tok_emb.weight"


class HessianCollector:
    """Accumulates ``H += Xᵀ diag(w) X`` in fp32 for chosen linear layers while the model runs.

    `X` is each call's input flattened to [tokens, in_features] (for the tied embedding, the final
    norm's output, which the embedding multiplies as the output head). Hooks fire once per call,
    so a block visited several times per forward contributes every visit. `row_weights`, when set,
    holds one weight per input position of the current batch (shaped like the input ids).
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        wanted = set(names) if names is not None else None
        self.targets: dict[str, nn.Module] = {}
        for module_name, module in model.named_modules():
            weight_name = f"{module_name}.weight"
            if isinstance(module, nn.Linear) and (wanted is None or weight_name in wanted):
                self.targets[weight_name] = module
        tied = getattr(model, "tie_embeddings", False) and hasattr(model, "final_norm")
        self.output_targets: dict[str, nn.Module] = {}
        if tied and (wanted is None or TIED_EMBEDDING in wanted):
            self.output_targets[TIED_EMBEDDING] = model.final_norm
        self.hessians: dict[str, Tensor] = {}
        self.rows: dict[str, float] = {}
        self.row_weights: Tensor | None = None
        self._handles: list[Any] = []

    def add(self, name: str, x: Tensor) -> None:
        x = x.detach().float()
        lead = x.shape[:-1].numel()
        x = x.reshape(-1, x.shape[-1])
        if self.row_weights is None:
            rows = float(lead)
        else:
            w = self.row_weights.to(device=x.device, dtype=torch.float32).reshape(-1)
            if w.numel() != lead:
                raise ValueError(f"calibration weights have {w.numel()} entries but {name}'s input has {lead} rows")
            x = x * w.sqrt()[:, None]
            rows = float(w.sum())
        h = self.hessians.get(name)
        if h is None:
            h = self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.rows[name] = 0.0
        h.addmm_(x.T, x)
        self.rows[name] += rows

    def __enter__(self) -> HessianCollector:
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_hook(
                lambda _m, inputs, _out, name=name: self.add(name, inputs[0])))
        for name, module in self.output_targets.items():
            self._handles.append(module.register_forward_hook(lambda _m, _in, out, name=name: self.add(name, out)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def collect_hessians(
    model: nn.Module,
    batches: Iterable[Tensor],
    names: Iterable[str] | None = None,
    row_weights: Callable[[Tensor], Tensor | None] | None = None,
    autocast: Callable[[], Any] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Run `batches` of input ids through the model and return (summed H, weighted rows) per weight.

    An untied output head is run too, so its input (the final hidden state) is collected.
    """
    was_training = model.training
    model.eval()
    collector = HessianCollector(model, names)
    head = getattr(model, "lm_head", None)
    try:
        with torch.no_grad(), collector:
            for ids in batches:
                collector.row_weights = row_weights(ids) if row_weights is not None else None
                with autocast() if autocast is not None else contextlib.nullcontext():
                    hidden = model.forward_hidden(ids)
                    if head is not None:
                        head(hidden)
    finally:
        model.train(was_training)
    return collector.hessians, collector.rows


def damped_hessian(hessian: Tensor, damp: float = 0.01) -> tuple[Tensor, Tensor]:
    """(H with dead columns neutralised and 0.01·mean(diag) added to the diagonal, dead mask).

    Dead columns get the live columns' mean diagonal rather than the records' constant 1, so the
    result scales exactly with H and GPTQ's output is invariant to scaling the Hessian.
    """
    h = hessian.detach().to(torch.float32).clone()
    diag = h.diagonal()
    dead = diag == 0
    live_mean = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), device=h.device)
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = live_mean
    diag.add_(damp * diag.mean())
    return h, dead

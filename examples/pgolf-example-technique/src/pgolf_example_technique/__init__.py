"""magnitude_prune: zero the smallest weights of each row before export, for a smaller artifact.

A third-party pgolf technique in one module, as the README's "Writing a technique" walks
through it. The artifact stores every quantized matrix as integer codes that an entropy coder
then compresses; a weight set to exactly zero becomes the code 0, the commonest symbol, so
pruning the smallest-magnitude fraction of every row buys bytes with a little BPB. Whether the
trade pays is what `pgolf ablate` measures.

The shape every technique follows:
- a functional core that works without pgolf's registry (`prune_rows`), unit-tested directly;
- a config dataclass whose defaults are the technique's recommended values (`PruneConfig`);
- a thin `Technique` subclass: metadata plus `pgolf_*` hook methods that wire the core in;
- imports from `pgolf.api` only (and its tests from `pgolf.testing` too): the rest of pgolf is the
  host's own business and may change under it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pgolf.api import RunContext, Technique, default_spec
from torch import Tensor, nn

__all__ = ["MagnitudePrune", "PruneConfig", "prune_rows"]
__version__ = "0.1.0"


def prune_rows(weight: Tensor, fraction: float) -> Tensor:
    """A copy of a 2-D `weight` with the `fraction` smallest-|w| entries of every row set to zero.

    Per row rather than per tensor because the export quantizes per row: each row keeps its
    own largest weights, so no row's scale collapses.
    """
    if weight.ndim != 2:
        raise ValueError(f"prune_rows expects a matrix, got shape {tuple(weight.shape)}")
    k = int(fraction * weight.size(1))
    if k == 0:
        return weight.clone()
    smallest = weight.abs().topk(k, dim=1, largest=False).indices
    return weight.scatter(1, smallest, 0.0)


@dataclass
class PruneConfig:
    """`fraction`: share of each row's entries zeroed, smallest magnitude first."""

    fraction: float = 0.05

    def validate(self) -> tuple[str, str] | None:
        if not 0.0 <= self.fraction < 1.0:
            return "fraction", f"fraction must lie in [0, 1), got {self.fraction}"
        return None


class MagnitudePrune(Technique):
    name = "magnitude_prune"
    summary = "Zero the smallest weights of each row of the quantized block matrices before export"
    Config = PruneConfig
    stage = "export"  # the trained checkpoint is reused when an ablation toggles it
    follows = "none: an example third-party technique (examples/pgolf-example-technique)"

    config: PruneConfig

    def pgolf_on_export_start(self, model: nn.Module, ctx: RunContext) -> None:
        """Prune in place the block matrices the host will store as integer codes."""
        zeroed = total = 0
        with torch.no_grad():
            for name, param in model.named_parameters():
                if not name.startswith("blocks.") or param.ndim != 2:
                    continue
                if default_spec(name, param, ctx.recipe.export).scheme != "int":
                    continue
                param.copy_(prune_rows(param, self.config.fraction))
                zeroed += int((param == 0).sum())
                total += param.numel()
        ctx.stash[self.name] = {"zeroed": zeroed, "weights": total}

    def pgolf_contribute_metrics(self, ctx: RunContext) -> dict[str, Any]:
        """How many weights went to zero, in result.json under metrics."""
        stats = ctx.stash.get(self.name, {"zeroed": 0, "weights": 0})
        return {"magnitude_prune_zeroed": stats["zeroed"],
                "magnitude_prune_zeroed_fraction": stats["zeroed"] / max(stats["weights"], 1)}

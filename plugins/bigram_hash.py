"""BigramHash: a hashed embedding of each (previous, current) input token pair (#1019/#1060).

``x = tok_emb(t_i) + scale * proj(table[hash(t_{i-1}, t_i)])`` at the input only. The hash is
``(36313 * t_i) XOR (27191 * t_{i-1}) mod (buckets - 1)`` in int32, and the first position of every
row takes the reserved last bucket; documents get no special treatment (the pair across a BOS is
hashed like any other). The table starts at zero, the projection orthogonal, the scale at 0.05.
The table trains with the token embedding's Adam rate, the projection and scale with the scalars'
(as both records). Parameter names are the records': `bigram.embed.weight`, `bigram.proj.weight`,
`bigram.scale`. The math is `pgolf.model.BigramHash`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique

MIN_PROJ_DIM = 64  # the records' init pass makes the projection orthogonal only at both dims >= 64


@dataclass
class BigramHashConfig:
    buckets: int = 3072  # BIGRAM_VOCAB_SIZE of #1019 (#1060: 2816; #549: 1536)
    dim: int = 112  # BIGRAM_DIM of #1019 and #1060 (#549: 128)

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.buckets < 2:
            problems.append(("buckets", f"buckets must be at least 2 (hashed pairs plus the first-position bucket), "
                                        f"got {self.buckets}"))
        if self.dim <= 0:
            problems.append(("dim", f"dim must be positive, got {self.dim}"))
        return problems


def use_bigram_hash(model: ModelConfig, buckets: int, dim: int) -> None:
    """Add the hashed previous/current token embedding to the input."""
    model.bigram_vocab_size = buckets
    model.bigram_dim = dim


class BigramHash(Technique):
    name = "bigram_hash"
    summary = "hashed (previous, current) token-pair embedding added to the input, projected and scaled"
    Config = BigramHashConfig
    stage = "train"
    follows = ("#1019 BigramHash 3072x112 (1.1147 with AR self-gen GPTQ + XSA-all); #1060 2816x112 (1.1122); "
               "concept #162")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_bigram_hash(ctx.recipe.model, self.config.buckets, self.config.dim)

    def pgolf_contribute_config_errors(self, ctx: RunContext) -> list[str]:
        model_dim, dim = ctx.recipe.model.model_dim, self.config.dim
        if dim != model_dim and min(dim, model_dim) < MIN_PROJ_DIM:
            return [f"techniques.bigram_hash: with dim {dim} and model_dim {model_dim} the projection is smaller "
                    f"than {MIN_PROJ_DIM} on a side, so it would start at zero behind a zero table and never learn; "
                    f"use dim >= {MIN_PROJ_DIM} or dim = model_dim."]
        return []

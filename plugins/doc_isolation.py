"""Document-isolated attention (#1530 VarLen): no position attends across a BOS.

The records from #1530 on (#1855, #1868, #2014, #2135 keep it) replace dense causal attention with
flash-attn's variable-length kernel. The loader hands each rank's micro-batch over as one packed row
and cuts it into segments (`_build_cu_seqlens`): a segment starts at the row start, at every BOS (the
BOS opens its document) and every `train_seq_len` tokens into a document, so a document longer than
the sequence is split from its own BOS, not at fixed row boundaries. Evaluation cuts at BOS and at
each window start (sliding windows) the same way. RoPE positions run along the packed row and do not
restart at a document; RoPE scores depend only on the distance between positions, and attention stays
inside a segment, so that is the same attention as restarted positions.

pgolf does the same through the model (`pgolf.model.document_layout`): the model derives the segments
from ``input_ids == bos_id`` in every forward, so plain, sliding-window and TTT scoring (chunked SGD,
document LoRA, global passes) are isolated with no change to their code, and the training loop packs
its micro-batches into one row with documents cut at the step's sequence length. On CPU (and compiled
or without flash-attn) attention is SDPA with a block-local document mask built once per forward; on
eager CUDA with flash-attn installed it is `flash_attn_varlen_func`, as the records.

Differences from the records: the plain (non-sliding) evaluation scores fixed windows, each its own
row, where #1530's `eval_val` packs a whole batch of windows into one row, so a document crossing a
window boundary keeps that context there; the records' training loader also starts each shard at its
first BOS and skips a shard's tail that does not fill a batch, where pgolf's stream reads on across shards.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgolf.api import ModelConfig, RunContext, Technique


@dataclass
class DocIsolationConfig:
    """No parameters: #1530 and its successors always isolate documents once VarLen is in."""


def use_doc_isolation(model: ModelConfig) -> None:
    """Attention within documents only; training rows packed as the records' varlen batches."""
    model.doc_isolation = True


class DocIsolation(Technique):
    name = "doc_isolation"
    summary = "attention never crosses a BOS: documents isolated in training and every evaluation (VarLen)"
    Config = DocIsolationConfig
    stage = "train"
    follows = ("#1530 VarLen attention (bundled with a fused MLP: ~2% faster, ~0.001 nats); kept by #1855, "
               "#1868, #2014, #2135")

    def pgolf_configure(self, ctx: RunContext) -> None:
        use_doc_isolation(ctx.recipe.model)

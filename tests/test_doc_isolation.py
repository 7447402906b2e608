"""Document-isolated attention (#1530 VarLen): the records' segment boundaries, the masked SDPA path
against attention run on each segment alone, and a model whose predictions ignore earlier documents
with XSA, partial RoPE, depth recurrence and two-lane residuals on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf.data.dataset import DistributedTokenLoader
from pgolf.host import Session, load_data
from pgolf.model import GPT, document_attention, document_layout, segment_starts, varlen_offsets
from pgolf.recipe import ModelConfig
from pgolf.reporter import Reporter
from pgolf_plugins.recurrence import RecurrenceConfig, apply_recurrence, set_loop_passes
from tests.conftest import pinned_threads

BOS = 1
# Rows with a document running in from before the row, short documents and one of 9 tokens.
ROWS = torch.tensor([
    [5, 1, 7, 8, 9, 1, 3, 4, 4, 4, 4, 4, 4, 4, 1, 2],
    [1, 6, 6, 6, 6, 6, 6, 6, 6, 6, 1, 9, 9, 1, 1, 3],
])


def record_boundaries(bos_pos: list[int], total_len: int, max_doc_len: int = 0) -> list[int]:
    """#1530 train_gpt.py:260-281 (`_build_cu_seqlens`) without its bucket padding, written out:
    row start and each BOS open a document; a document is cut every max_doc_len tokens from its start."""
    starts = sorted({0, *bos_pos})
    out = []
    for start, end in zip(starts, [*starts[1:], total_len], strict=True):
        out += list(range(start, end, max_doc_len)) if max_doc_len > 0 else [start]
    return [*out, total_len]


def test_segments_start_where_the_records_cut_them():
    flat = ROWS.reshape(1, -1)  # one packed row, as the records' training batches
    bos = (flat[0] == BOS).nonzero().squeeze(1).tolist()
    for cap in (0, 4, 8):
        cu, longest = varlen_offsets(segment_starts(flat, BOS, cap))
        want = record_boundaries(bos, flat.numel(), cap)
        assert cu.tolist() == want
        assert longest == max(b - a for a, b in zip(want, want[1:], strict=False))
    # separate rows (evaluation windows): every row start opens a segment too
    cu, _ = varlen_offsets(segment_starts(ROWS, BOS))
    assert cu.tolist() == [0, 1, 5, 14, 16, 26, 29, 30, 32]


def per_segment_attention(q, k, v, starts):
    """Reference: causal SDPA run on each segment alone."""
    out = torch.empty_like(q)
    for row in range(q.size(0)):
        bounds = [*starts[row].nonzero().squeeze(1).tolist(), q.size(2)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            out[row, :, a:b] = F.scaled_dot_product_attention(q[row:row + 1, :, a:b], k[row:row + 1, :, a:b],
                                                              v[row:row + 1, :, a:b], is_causal=True,
                                                              enable_gqa=True)[0]
    return out


@pytest.mark.parametrize(("packed", "cap"), [(False, 0), (True, 0), (True, 4), (True, 8)])
def test_masked_attention_equals_attention_on_each_segment_alone(packed, cap):
    """The CPU / compiled path (SDPA with the block-local mask) against each segment run alone: the
    flash-attn varlen path computes the latter, so both CUDA paths agree through it."""
    ids = ROWS.reshape(1, -1) if packed else ROWS
    generator = torch.Generator().manual_seed(0)
    bsz, seq_len = ids.shape
    q = torch.randn(bsz, 4, seq_len, 8, generator=generator)
    k, v = (torch.randn(bsz, 2, seq_len, 8, generator=generator) for _ in range(2))
    doc = document_layout(ids, BOS, cap)
    assert doc.block == (cap or seq_len) and doc.cu_seqlens is None
    got = document_attention(q, k, v, doc)
    want = per_segment_attention(q, k, v, segment_starts(ids, BOS, cap))
    assert (got - want).abs().max().item() <= 1e-6


def stack(**kw) -> ModelConfig:
    """A toy model with the records' attention options: XSA on every layer, partial RoPE, GQA."""
    fields = {"vocab_size": 32, "num_layers": 4, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "rope_dims": 4,
              "xsa_last_n": 4, "doc_isolation": True}
    return ModelConfig(**{**fields, **kw})


def toy(cfg: ModelConfig, loop: bool = False) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg, bos_id=BOS)
    if loop:
        rec = RecurrenceConfig(loop_start=1, loop_end=2, num_loops=1, untie_mlp=True)
        apply_recurrence(model, rec)
        set_loop_passes(model, rec, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("variant", ["plain", "looped_two_lane"])
def test_a_position_never_sees_an_earlier_document(variant):
    model = toy(stack(parallel_variant="two_lane", parallel_start_layer=2) if variant != "plain" else stack(),
                loop=variant != "plain")
    ids = ROWS.clone()
    changed = ids.clone()
    changed[0, 2:5] = torch.tensor([11, 12, 13])  # the first row's second document, same length
    changed[0, 0] = 17  # and the tail of the document before the row
    with pinned_threads(), torch.no_grad():
        before, after = model.log_probs(ids), model.log_probs(changed)
    assert torch.equal(before[0, 5:], after[0, 5:])  # later documents: bit for bit
    assert (before[0, 2:5] - after[0, 2:5]).abs().max() > 1e-3  # the changed document itself does change
    # A document scores as it does alone in its own row: same positions, or (RoPE is relative) any
    # other offset up to rounding.
    doc = ids[0, 5:14]
    alone = torch.cat((doc, torch.tensor([BOS] * 7)))[None]
    with pinned_threads(), torch.no_grad():
        assert (model.log_probs(alone)[0, :9] - before[0, 5:14]).abs().max().item() <= 1e-5
        isolated_off = toy(stack(doc_isolation=False)).log_probs(ids)
    assert (isolated_off[0, 5:] - model.log_probs(ids)[0, 5:]).abs().max() > 1e-3  # isolation does act


def test_a_packed_training_row_is_the_rows_of_its_pieces():
    """Training's packed row with documents cut at 8 tokens gives the loss of those pieces run as rows."""
    model = toy(stack())
    flat = ROWS.reshape(1, -1)
    targets = torch.roll(flat, -1, dims=1)
    starts = segment_starts(flat, BOS, 8)[0].nonzero().squeeze(1).tolist()
    with pinned_threads(), torch.no_grad():
        packed = model.token_nll(flat, targets)  # rows bound segments only at the row start here
        packed_loss = model(flat, targets, max_doc_len=8)
        pieces = [model.token_nll(flat[:, a:b], targets[:, a:b]) for a, b in
                  zip(starts, [*starts[1:], flat.size(1)], strict=False)]
    assert (packed_loss - torch.cat(pieces, dim=1).mean()).abs().item() <= 1e-5
    assert (packed_loss - packed.mean()).abs().item() > 1e-4  # the cap changes what attention sees


def test_the_training_loader_packs_each_micro_batch_into_one_row(micro_recipe):
    session = Session(micro_recipe(techniques={"doc_isolation": {}}), reporter=Reporter(quiet=True))
    load_data(session)
    assert session.recipe.model.doc_isolation
    stream = session.data.train_stream()
    x, y = DistributedTokenLoader(stream, 0, 1, torch.device("cpu")).next_batch(1024, 64, 1, packed=True)
    rows_x, _ = DistributedTokenLoader(session.data.train_stream(), 0, 1, torch.device("cpu")).next_batch(1024, 64, 1)
    assert x.shape == y.shape == (1, 1024) and rows_x.shape == (16, 64)
    assert torch.equal(x.reshape(16, 64), rows_x)

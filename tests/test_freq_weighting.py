"""Frequency weighting: counts from training shards only, the row split, the Hessian boost, the loss
weights, and the plugin's three modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf.artifact import decode_artifact
from pgolf.calibration import HessianCollector
from pgolf.context import DataView, RunContext
from pgolf.data import shards
from pgolf.data.bpb import build_byte_tables
from pgolf.data.dataset import load_dataset
from pgolf.data.tokenizer import load_tokenizer
from pgolf.errors import ConfigError, DataError
from pgolf.host import Session, evaluate_target, export_stage, load_data, run, train_stage
from pgolf.model import GPT
from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf.recipe import ModelConfig
from pgolf.reporter import Reporter
from pgolf_plugins.freq_weighting import (
    FreqWeighting,
    FreqWeightingConfig,
    add_row_group,
    byte_length_weights,
    count_token_frequencies,
    inverse_frequency_weights,
    position_weights,
    top_tokens,
)
from tests.micro_training import technique

QUIET = Reporter(quiet=True)


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    shards.write_shard(tmp_path / shards.shard_name("train", 0), rng.integers(0, 50, 1000))
    shards.write_shard(tmp_path / shards.shard_name("train", 1), rng.integers(0, 50, 500))
    shards.write_shard(tmp_path / shards.shard_name("val", 0), np.full(300, 7))
    return tmp_path


def test_counts_match_bincount_and_stop_reading_at_the_cap(shard_dir):
    files = shards.list_shards(shard_dir, shards.TRAIN_GLOB)
    arrays = [np.asarray(shards.read_shard(f)) for f in files]
    tokens = np.concatenate(arrays).astype(np.int64)
    assert np.array_equal(count_token_frequencies(arrays, 64), np.bincount(tokens, minlength=64))
    taken = []

    def lazily():
        for a in arrays:
            taken.append(len(a))
            yield a

    capped = count_token_frequencies(lazily(), 64, max_tokens=1000)
    assert np.array_equal(capped, np.bincount(tokens[:1000], minlength=64))
    assert taken == [1000]  # the second shard is never read
    capped = count_token_frequencies(arrays, 64, max_tokens=1200)
    assert np.array_equal(capped, np.bincount(tokens[:1200], minlength=64))
    with pytest.raises(DataError, match="no training shards"):
        count_token_frequencies([], 64)


def test_the_data_view_yields_only_training_shards_and_ledgers_them(micro_recipe):
    """What frequency counting reads: every training shard, never a validation shard, each read recorded."""
    r = micro_recipe()
    ds = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size)
    assert ds.val_files and ds.train_files
    view = DataView(ds.bos_id, ds.vocab_size, ds)
    before = {p: list(n) for p, n in ds.ledger.reads.items()}
    arrays = list(view.train_shard_tokens("frequency"))
    assert len(arrays) == len(ds.train_files)
    for array, path in zip(arrays, ds.train_files, strict=True):
        assert np.array_equal(array, shards.read_shard(path, ds.vocab_size))
    assert ds.ledger.reads["frequency"] == [p.name for p in ds.train_files]
    assert all(n.startswith("fineweb_train") for n in ds.ledger.reads["frequency"])
    assert {p: n for p, n in ds.ledger.reads.items() if p != "frequency"} == before  # nothing else read
    assert not ds.ledger.validation_reads_outside_eval()
    val_tokens = np.concatenate([np.asarray(shards.read_shard(p, ds.vocab_size)) for p in ds.val_files])
    assert not any(a.shape == val_tokens.shape and np.array_equal(a, val_tokens) for a in arrays)
    with pytest.raises(ValueError, match="purpose"):
        next(view.train_shard_tokens("eval"))


def test_top_k_breaks_ties_by_id():
    counts = np.array([5, 9, 5, 9, 1, 5])
    assert top_tokens(counts, 4).tolist() == [1, 3, 0, 2]


def test_row_split_round_trip():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * 0.02
    frequent = np.array([3, 17, 30])
    spec = QuantSpec("int", bits=7, clip="none", scale_floor=1e-10)
    add_row_group(spec, frequent, top_bits=8, rest_bits=6)
    qt = quantize_rtn("tok_emb.weight", w, spec)
    back = dequantize(qt)
    assert back.shape == w.shape
    row_bits = qt.parts["row_bits"]
    assert row_bits[frequent].tolist() == [8, 8, 8] and int((row_bits == 6).sum()) == 37
    err = (back - w).abs().amax(dim=1)
    step = w.abs().amax(dim=1)
    top = torch.zeros(40, dtype=torch.bool)
    top[frequent] = True
    assert (err[top] <= step[top] / 127 / 2 * 1.01).all()
    assert (err[~top] <= step[~top] / 31 / 2 * 1.01).all()
    assert (err[~top].mean() > 3 * err[top].mean())


def test_hessian_boost_equals_counting_those_rows_twice():
    model = GPT(ModelConfig(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1))
    ids = torch.tensor([[1, 5, 9, 5], [2, 9, 9, 3]])
    x = torch.randn(2, 4, 16)
    weighted = HessianCollector(model)
    weighted.row_weights = position_weights(ids, torch.tensor([5, 9]), boost=2.0)
    weighted.add("w", x)
    duplicated = HessianCollector(model)
    hit = torch.isin(ids, torch.tensor([5, 9])).reshape(-1)
    flat = x.reshape(-1, 16)
    duplicated.add("w", torch.cat([flat, flat[hit]]))
    torch.testing.assert_close(weighted.hessians["w"], duplicated.hessians["w"])
    assert weighted.rows["w"] == duplicated.rows["w"] == 8 + 5


def test_loss_weights():
    counts = np.array([100, 10, 1, 0])
    w = inverse_frequency_weights(counts, alpha=0.5)
    assert w[0] < w[1] < w[2] < w[3]
    assert float((w.double() * torch.tensor(counts)).sum() / counts.sum()) == pytest.approx(1.0)
    assert torch.equal(inverse_frequency_weights(counts, 0.0), torch.ones(4))
    assert byte_length_weights(np.array([0, 3, 1, 7], dtype=np.int16), 4).tolist() == [1.0, 3.0, 1.0, 7.0]


def test_byte_length_loss_weights_come_from_the_runs_tokenizer(micro_recipe):
    r = micro_recipe()
    ds = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size)
    ctx = RunContext(r, torch.device("cpu"), data=DataView(ds.bos_id, ds.vocab_size, ds))
    weights = FreqWeighting(FreqWeightingConfig(mode="loss")).pgolf_contribute_loss_weights(ctx)
    tables = build_byte_tables(load_tokenizer(ds.tokenizer_path, ds.vocab_size), ds.vocab_size)
    assert weights.shape == (ds.vocab_size,) and float(weights.min()) >= 1.0 and float(weights.max()) > 1.0
    assert torch.equal(weights, byte_length_weights(tables.base_bytes, ds.vocab_size))
    assert "frequency" not in ds.ledger.reads  # byte weights count nothing


def test_equal_loss_weights_give_the_plain_mean_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1))
    x, y = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    plain = model(x, y)
    model.loss_weights = inverse_frequency_weights(np.full(32, 9), alpha=0.7)
    torch.testing.assert_close(model(x, y), plain)


def test_embed_quant_counts_training_shards_only_and_stores_row_bits(micro_recipe, tmp_path):
    session = Session(micro_recipe(techniques={"freq_weighting": {"top_k": 10}}), reporter=QUIET)
    load_data(session)
    trained = train_stage(session)
    exported = export_stage(session, trained)
    ds = session.data
    assert ds.ledger.reads["frequency"] and set(ds.ledger.reads["frequency"]) <= {f.name for f in ds.train_files}
    assert exported.ledger["frequency"] == ds.ledger.reads["frequency"]
    assert not ds.ledger.validation_reads_outside_eval()
    assert exported.info["quant_notes"]["tok_emb.weight"] == ["freq_weighting: 10 frequent rows int8, rest int6"]
    tensors, _ = decode_artifact(exported.blob)
    row_bits = tensors["tok_emb.weight"].parts["row_bits"]
    counts = technique(session, "freq_weighting").counts
    assert sorted(np.flatnonzero(row_bits.numpy() == 8).tolist()) == sorted(top_tokens(counts, 10).tolist())


def test_loss_mode_is_a_training_stage_technique_and_eval_stays_unweighted(micro_recipe, tmp_path):
    recipe = micro_recipe(techniques={"freq_weighting": {"mode": "loss", "loss_weighting": "inverse_frequency"}})
    session = Session(recipe, reporter=QUIET)
    assert session.enabled[0].stage == "train"
    result = run(recipe, tmp_path, QUIET)
    assert result["valid"]
    again = evaluate_target(tmp_path, log=lambda m: None)  # decoding the artifact reads no training data
    assert again["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)


def test_hessian_mode_needs_gptq_and_weights_its_calibration(micro_recipe):
    with pytest.raises(ConfigError, match="provides calibration batches; enable gptq"):
        Session(micro_recipe(techniques={"freq_weighting": {"mode": "hessian"}}), reporter=QUIET)
    techniques = {"freq_weighting": {"mode": "hessian", "top_k": 20}, "gptq": {"calibration_batches": 2}}
    session = Session(micro_recipe(techniques=techniques), reporter=QUIET)
    load_data(session)
    trained = train_stage(session)
    export_stage(session, trained)
    boosted = technique(session, "gptq").hessians(session.ctx)  # the host's Hessians of this export
    plain_session = Session(micro_recipe(techniques={"gptq": {"calibration_batches": 2}}), reporter=QUIET)
    load_data(plain_session)
    export_stage(plain_session, trained)
    plain = technique(plain_session, "gptq").hessians(plain_session.ctx)
    assert boosted.keys() == plain.keys()
    assert not torch.allclose(boosted["blocks.0.attn.c_q.weight"], plain["blocks.0.attn.c_q.weight"])
    calls = session.trace.stats["freq_weighting"]["pgolf_contribute_calibration_weights"].calls
    assert calls == 2

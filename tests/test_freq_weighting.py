"""Frequency weighting: counts from training shards only, the row split, the Hessian boost, the loss
weights, and the plugin's three modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pgolf import shards
from pgolf.data import DataLedger
from pgolf.errors import ConfigError, DataError
from pgolf.lifecycle import Session, run_recipe
from pgolf.model import GPT
from pgolf.quant import QuantSpec, dequantize, quantize_rtn
from pgolf.recipe import ModelConfig
from pgolf.reporter import Reporter
from pgolf_plugins.freq_weighting import (
    add_row_group,
    byte_length_weights,
    count_token_frequencies,
    inverse_frequency_weights,
    position_weights,
    top_tokens,
)
from pgolf_plugins.gptq import HessianCollector

QUIET = Reporter(quiet=True)


@pytest.fixture
def shard_dir(tmp_path):
    rng = np.random.default_rng(0)
    shards.write_shard(tmp_path / shards.shard_name("train", 0), rng.integers(0, 50, 1000))
    shards.write_shard(tmp_path / shards.shard_name("train", 1), rng.integers(0, 50, 500))
    shards.write_shard(tmp_path / shards.shard_name("val", 0), np.full(300, 7))
    return tmp_path


def test_counts_match_bincount_over_training_shards(shard_dir):
    files = shards.list_shards(shard_dir, shards.TRAIN_GLOB)
    tokens = np.concatenate([np.asarray(shards.read_shard(f)) for f in files]).astype(np.int64)
    ledger = DataLedger()
    counts = count_token_frequencies(files, 64, ledger=ledger)
    assert np.array_equal(counts, np.bincount(tokens, minlength=64))
    assert ledger.reads == {"frequency": [f.name for f in files]}
    capped = count_token_frequencies(files, 64, max_tokens=1200)
    assert np.array_equal(capped, np.bincount(tokens[:1200], minlength=64))


def test_a_validation_shard_is_refused(shard_dir):
    files = [*shards.list_shards(shard_dir, shards.TRAIN_GLOB), *shards.list_shards(shard_dir, shards.VAL_GLOB)]
    ledger = DataLedger()
    with pytest.raises(DataError, match="training shards only.*fineweb_val_000000.bin"):
        count_token_frequencies(files, 64, ledger=ledger)
    assert ledger.reads == {}  # refused before reading anything


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


def test_equal_loss_weights_give_the_plain_mean_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1))
    x, y = torch.randint(0, 32, (2, 8)), torch.randint(0, 32, (2, 8))
    plain = model(x, y)
    model.loss_weights = inverse_frequency_weights(np.full(32, 9), alpha=0.7)
    torch.testing.assert_close(model(x, y), plain)


def test_embed_quant_counts_training_shards_only_and_stores_row_bits(micro_recipe, tmp_path):
    session = Session(micro_recipe(techniques={"freq_weighting": {"top_k": 10}}), reporter=QUIET)
    session.load_data()
    trained = session.train()
    exported = session.export(trained.model, trained.info)
    ds = session.ctx.dataset
    assert ds.ledger.reads["frequency"] and set(ds.ledger.reads["frequency"]) <= {f.name for f in ds.train_files}
    assert not ds.ledger.validation_reads_outside_eval()
    assert exported.info["quant_notes"]["tok_emb.weight"] == ["freq_weighting: 10 frequent rows int8, rest int6"]
    from pgolf.artifact import decode_artifact

    tensors, _ = decode_artifact(exported.blob)
    row_bits = tensors["tok_emb.weight"].parts["row_bits"]
    counts = session.ctx.technique("freq_weighting").counts
    assert sorted(np.flatnonzero(row_bits.numpy() == 8).tolist()) == sorted(top_tokens(counts, 10).tolist())


def test_loss_mode_is_a_training_stage_technique_and_eval_stays_unweighted(micro_recipe, tmp_path):
    recipe = micro_recipe(techniques={"freq_weighting": {"mode": "loss", "loss_weighting": "inverse_frequency"}})
    session = Session(recipe, reporter=QUIET)
    assert session.enabled[0].stage == "train"
    result = run_recipe(recipe, tmp_path, QUIET)
    assert result["valid"]
    from pgolf.evalonly import evaluate_target

    again = evaluate_target(tmp_path, log=lambda m: None)  # decoding the artifact reads no training data
    assert again["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-9)


def test_hessian_mode_needs_gptq_and_weights_its_calibration(micro_recipe):
    with pytest.raises(ConfigError, match="enable gptq"):
        Session(micro_recipe(techniques={"freq_weighting": {"mode": "hessian"}}), reporter=QUIET)
    techniques = {"freq_weighting": {"mode": "hessian", "top_k": 20}, "gptq": {"calibration_batches": 2}}
    session = Session(micro_recipe(techniques=techniques), reporter=QUIET)
    session.load_data()
    trained = session.train()
    session.export(trained.model, trained.info)
    boosted = session.ctx.technique("gptq").hessians(session.ctx)
    plain_session = Session(micro_recipe(techniques={"gptq": {"calibration_batches": 2}}), reporter=QUIET)
    plain_session.load_data()
    plain_session.export(trained.model, trained.info)
    plain = plain_session.ctx.technique("gptq").hessians(plain_session.ctx)
    assert boosted.keys() == plain.keys()
    assert not torch.allclose(boosted["blocks.0.attn.c_q.weight"], plain["blocks.0.attn.c_q.weight"])
    calls = session.trace.stats["freq_weighting"]["pgolf_contribute_calibration_weights"].calls
    assert calls == 2

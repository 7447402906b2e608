"""GPTQ: the functional core (factor, codes, spec honouring), Hessian collection (the host's, in
pgolf.calibration), self-generation, and the plugin's calibration inside the training budget."""

from __future__ import annotations

import json

import pytest
import torch

from pgolf.calibration import HessianCollector, collect_hessians
from pgolf.context import DataView, RunContext
from pgolf.errors import ConfigError
from pgolf.host import Session, export_stage, load_data, run, train_stage
from pgolf.model import GPT
from pgolf.quant import QuantSpec, dequantize, quantize_rows, quantize_rtn
from pgolf.recipe import ModelConfig
from pgolf.reporter import Reporter
from pgolf_plugins.gptq import GPTQ, GPTQConfig, factorize, gptq_codes, gptq_quantize, self_generate, spec_scales
from tests.micro_training import stored_tensors, technique

QUIET = Reporter(quiet=True)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


def sigma_spec(bits: int = 6, k: float = 3.0) -> QuantSpec:
    return QuantSpec("int", bits=bits, clip="sigmas", clip_sigmas=k, scale_floor=1e-10)


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the layer-output error GPTQ minimises."""
    e = (w - w_hat).double()
    return float(torch.einsum("ij,jk,ik->", e, h.double(), e))


def test_identity_hessian_equals_round_to_nearest_with_the_same_scales():
    torch.manual_seed(0)
    w = torch.randn(48, 300)
    spec = sigma_spec(k=2.5)  # small k so clipping happens too
    spec.row_groups.append((torch.tensor([3, 7]), 8))
    spec.row_scale = torch.linspace(0.8, 1.2, 48)  # a per-row clip factor (Hessian-aware SDClip) is honoured
    scale16, row_qmax, clip, bits = spec_scales(w, spec)
    codes = gptq_codes(w, factorize(torch.eye(300)), scale16.float(), row_qmax, clip, block_size=128)
    expected = torch.empty_like(codes)
    for b in (6, 8):
        rows = bits == b
        clipped = torch.maximum(torch.minimum(w[rows], clip[rows, None]), -clip[rows, None])
        expected[rows] = quantize_rows(clipped, scale16.float()[rows], b)
    assert torch.equal(codes, expected)
    assert codes[3].abs().max() > 31  # the int8 rows really use their wider range
    torch.testing.assert_close(clip, 2.5 * w.std(dim=1) * spec.row_scale)


def test_output_is_invariant_to_scaling_the_hessian():
    torch.manual_seed(1)
    x = correlated_inputs(600, 96)
    h = x.T @ x
    w = torch.randn(40, 96)
    scale16, row_qmax, clip, _ = spec_scales(w, sigma_spec())
    base = gptq_codes(w, factorize(h), scale16.float(), row_qmax, clip, block_size=32)
    assert torch.equal(base, gptq_codes(w, factorize(h * 4.0), scale16.float(), row_qmax, clip, block_size=32))
    other = gptq_codes(w, factorize(h * 1234.567), scale16.float(), row_qmax, clip, block_size=32)
    assert (other == base).float().mean() > 0.999  # equal up to float reassociation at exact ties


def test_dead_columns_quantize_to_zero_and_scaling_still_holds():
    torch.manual_seed(2)
    x = correlated_inputs(400, 64)
    x[:, [5, 17, 40]] = 0
    h = x.T @ x
    w = torch.randn(32, 64)
    scale16, row_qmax, clip, _ = spec_scales(w, sigma_spec(k=4.0))
    factor = factorize(h)
    assert factor.dead.nonzero().squeeze(1).tolist() == [5, 17, 40]
    codes = gptq_codes(w, factor, scale16.float(), row_qmax, clip)
    assert codes[:, [5, 17, 40]].abs().sum() == 0
    assert torch.equal(codes, gptq_codes(w, factorize(h * 8.0), scale16.float(), row_qmax, clip))


def test_error_propagation_lowers_the_layer_output_error():
    torch.manual_seed(3)
    x = correlated_inputs(2000, 128)
    h = x.T @ x / x.shape[0]
    w = torch.randn(64, 128) * 0.05
    spec = sigma_spec(bits=4, k=6.0)
    gptq = dequantize(gptq_quantize(w, factorize(h), spec))
    rtn_spec = sigma_spec(bits=4, k=6.0)
    scale16 = spec_scales(w, rtn_spec)[0].float()
    rtn = quantize_rows(w, scale16, 4).float() * scale16[:, None]
    assert proxy_loss(w, gptq, h) < 0.8 * proxy_loss(w, rtn, h)


def test_block_size_only_regroups_the_same_updates():
    torch.manual_seed(4)
    x = correlated_inputs(500, 100)
    h = x.T @ x
    w = torch.randn(24, 100)
    scale16, row_qmax, clip, _ = spec_scales(w, sigma_spec())
    factor = factorize(h)
    a = gptq_codes(w, factor, scale16.float(), row_qmax, clip, block_size=16)
    b = gptq_codes(w, factor, scale16.float(), row_qmax, clip, block_size=100)
    assert (a == b).float().mean() > 0.995


def test_act_order_sorts_columns_by_descending_hessian_diagonal():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0, 0.0]))
    factor = factorize(h)
    assert [c for c in factor.perm.tolist() if c != 3] == [1, 2, 0]
    assert factorize(h, act_order=False).perm.tolist() == [0, 1, 2, 3]


def test_gptq_honours_the_baseline_percentile_spec_and_stores_host_layout():
    torch.manual_seed(5)
    w = torch.randn(20, 64) * 0.01  # tiny rows: the baseline's 1/127 floor limits the codes
    spec = QuantSpec("int", bits=8, clip="percentile", clip_percentile=99.99984)
    qt = gptq_quantize(w, factorize(torch.eye(64)), spec)
    rtn = quantize_rtn("w", w, spec)
    assert qt.kind == rtn.kind == "int_rows" and qt.parts.keys() == rtn.parts.keys()
    assert torch.equal(qt.parts["scale"], rtn.parts["scale"])
    # codes may differ only where the fp32 scale RTN divides by rounds differently from the stored fp16 one
    assert (qt.parts["q"] != rtn.parts["q"]).float().mean() < 0.01


def tiny_gpt(layers: int = 4) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=layers, model_dim=32, num_heads=2, num_kv_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # break the zero-initialised projections
    return model


def test_a_looped_block_sums_its_hessian_over_every_pass():
    model = tiny_gpt()
    model.encoder_indices, model.decoder_indices = [0, 1, 2, 1], [2, 1, 2, 3]
    model.looping_active = True
    ids = torch.randint(0, 64, (3, 16))
    passes: dict[int, list[torch.Tensor]] = {}

    def capture(index):
        def hook(block, args):
            x, x0 = args
            mix = block.resid_mix
            mixed = mix[0][None, None, :] * x + mix[1][None, None, :] * x0
            passes.setdefault(index, []).append(block.attn_norm(mixed) * block.norm_scale)
        return hook

    handles = [b.register_forward_pre_hook(capture(i)) for i, b in enumerate(model.blocks)]
    summed, rows = collect_hessians(model, [ids])
    for handle in handles:
        handle.remove()
    assert len(passes[1]) == 3 and len(passes[2]) == 3 and len(passes[0]) == 1
    for index in (0, 1, 2):
        manual = sum(x.reshape(-1, 32).T @ x.reshape(-1, 32) for x in passes[index])
        torch.testing.assert_close(summed[f"blocks.{index}.attn.c_q.weight"], manual, rtol=1e-5, atol=1e-4)
        assert rows[f"blocks.{index}.attn.c_q.weight"] == 48 * len(passes[index])


def test_tied_embedding_hessian_comes_from_the_final_norm_output():
    model = tiny_gpt(2)
    ids = torch.randint(0, 64, (2, 12))
    summed, _ = collect_hessians(model, [ids])
    with torch.no_grad():
        hidden = model.forward_hidden(ids).reshape(-1, 32)
    torch.testing.assert_close(summed["tok_emb.weight"], hidden.T @ hidden, rtol=1e-5, atol=1e-5)
    assert "blocks.0.mlp.proj.weight" in summed and summed["blocks.0.mlp.proj.weight"].shape == (64, 64)


def test_untied_head_gets_its_hessian_and_the_collector_leaves_no_hooks():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                            tie_embeddings=False))
    ids = torch.randint(0, 64, (2, 8))
    summed, _ = collect_hessians(model, [ids])
    assert "lm_head.weight" in summed and "tok_emb.weight" not in summed
    assert not model.final_norm._forward_hooks and not model.blocks[0].attn.c_q._forward_hooks


def test_row_weights_must_match_the_batch():
    model = tiny_gpt(2)
    collector = HessianCollector(model)
    collector.row_weights = torch.ones(5)
    with pytest.raises(ValueError, match="calibration weights"):
        collector.add("x", torch.randn(2, 4, 32))


def test_self_generation_is_seeded_and_starts_at_bos():
    model = tiny_gpt(2)
    a = self_generate(model, 5, 10, 0.8, seed=7, bos_id=1, device=torch.device("cpu"), batch_size=2)
    b = self_generate(model, 5, 10, 0.8, seed=7, bos_id=1, device=torch.device("cpu"), batch_size=2)
    c = self_generate(model, 5, 10, 0.8, seed=8, bos_id=1, device=torch.device("cpu"), batch_size=2)
    assert a.shape == (5, 10) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == 1).all() and int(a.max()) < 64 and model.training


def test_self_generation_samples_from_the_model():
    model = tiny_gpt(2)
    cold = self_generate(model, 2, 6, 1e-4, seed=0, bos_id=1, device=torch.device("cpu"))
    greedy = torch.full((2, 1), 1)
    with torch.no_grad():
        for _ in range(5):
            nxt = model.logits(model.forward_hidden(greedy))[:, -1].argmax(-1, keepdim=True)
            greedy = torch.cat([greedy, nxt], dim=1)
    assert torch.equal(cold, greedy)  # near-zero temperature is greedy decoding


class FakeServices:
    """Stands in for the host's services: fixed calibration Hessians, counting requests."""

    def __init__(self, hessians):
        self.hessians, self.requests = hessians, 0

    def calibration_hessians(self):
        self.requests += 1
        return self.hessians


def test_self_generated_batches_are_the_models_own_text_from_bos(micro_recipe):
    recipe = micro_recipe()
    config = GPTQConfig(calibration="self_generated", self_gen_sequences=5, self_gen_seq_len=6, self_gen_batch=2)
    plugin = GPTQ(config)
    ctx = RunContext(recipe, torch.device("cpu"), data=DataView(bos_id=3, vocab_size=64))
    model = tiny_gpt(2)
    batches = plugin.pgolf_provide_calibration_batches(model, ctx)
    assert [tuple(b.shape) for b in batches] == [(2, 6), (2, 6), (1, 6)]
    expected = self_generate(model, 5, 6, 0.8, seed=recipe.seed, bos_id=3, device=torch.device("cpu"),
                             batch_size=2, context_len=recipe.train.seq_len)
    assert torch.equal(torch.cat(batches), expected)
    assert plugin.pgolf_contribute_metrics(ctx)["gptq_calibration_tokens"] == 5 * 6


def test_the_plugin_quantizes_against_the_hosts_hessians_once_per_export(micro_recipe):
    torch.manual_seed(6)
    x = correlated_inputs(300, 64)
    h = x.T @ x / 300
    w = torch.randn(16, 64)
    services = FakeServices({"w": h})
    ctx = RunContext(micro_recipe(), torch.device("cpu"), services=services)
    plugin = GPTQ(GPTQConfig(calibration="self_generated"))
    plugin.pgolf_on_export_start(tiny_gpt(2), ctx)
    assert services.requests == 0  # self-generated calibration stays lazy
    qt = plugin.pgolf_quantize_tensor("w", w, sigma_spec(), ctx)
    assert torch.equal(qt.parts["q"], gptq_quantize(w, factorize(h), sigma_spec()).parts["q"])
    assert plugin.pgolf_quantize_tensor("w", w, sigma_spec(), ctx) is qt  # memo: the same spec again
    assert plugin.pgolf_quantize_tensor("other", w, sigma_spec(), ctx) is None  # no Hessian: RTN
    assert services.requests == 1 and len(plugin._factors) == 1
    plugin.pgolf_on_export_start(tiny_gpt(2), ctx)  # a new export forgets Hessians, factors and codes
    assert not plugin._factors and not plugin._memo
    train = GPTQ(GPTQConfig(calibration="train"))
    train.pgolf_on_export_start(tiny_gpt(2), ctx)
    assert services.requests == 2  # training-shard calibration happens at export start
    metrics = train.pgolf_contribute_metrics(ctx)
    assert metrics["gptq_hessians"] == 1 and metrics["gptq_rtn_fallback"] == []
    assert plugin.pgolf_contribute_metrics(ctx)["gptq_rtn_fallback"] == ["other"]


def test_gptq_needs_a_reserve_on_wallclock_runs(micro_recipe):
    with pytest.raises(ConfigError, match="reserve_seconds"):
        Session(micro_recipe("train.max_wallclock_seconds=60", techniques={"gptq": {"reserve_seconds": 0}}),
                reporter=QUIET)
    Session(micro_recipe("train.max_wallclock_seconds=60",
                         techniques={"gptq": {"reserve_seconds": 0, "calibration": "self_generated"}}), reporter=QUIET)


def test_train_calibration_reads_training_shards_inside_the_budget(micro_recipe):
    session = Session(micro_recipe(techniques={"gptq": {"calibration_batches": 2}}), reporter=QUIET)
    load_data(session)
    trained = train_stage(session)
    assert trained.info["reserve_seconds"] == 4.0
    exported = export_stage(session, trained)
    reads = session.data.ledger.reads
    assert reads["calibration"] and all(n.startswith("fineweb_train") for n in reads["calibration"])
    assert exported.ledger["calibration"] == reads["calibration"]
    assert exported.info["calibration_seconds"] > 0
    metrics = technique(session, "gptq").pgolf_contribute_metrics(session.ctx)
    # the Hessians were collected inside pgolf_on_export_start, the time the host charges to training
    assert 0 < metrics["gptq_calibration_seconds"] <= exported.info["calibration_seconds"] + 0.0005  # (rounded)
    assert metrics["gptq_calibration_tokens"] == 2 * 1024 and metrics["gptq_hessians"] == 13
    assert metrics["gptq_rtn_fallback"] == []


def test_self_generated_calibration_reads_no_data_and_is_not_charged(micro_recipe):
    params = {"calibration": "self_generated", "self_gen_sequences": 3, "self_gen_seq_len": 24, "self_gen_batch": 2}
    session = Session(micro_recipe(techniques={"gptq": params}), reporter=QUIET)
    load_data(session)
    trained = train_stage(session)
    assert trained.info["reserve_seconds"] == 0.0
    exported = export_stage(session, trained)
    assert "calibration" not in session.data.ledger.reads and "calibration" not in exported.ledger
    metrics = technique(session, "gptq").pgolf_contribute_metrics(session.ctx)
    assert metrics["gptq_calibration"] == "self_generated" and metrics["gptq_calibration_tokens"] == 3 * 24
    assert exported.info["calibration_seconds"] < metrics["gptq_calibration_seconds"]


@pytest.mark.slow
def test_two_gloo_ranks_sum_their_hessians_into_the_single_process_artifact(micro_recipe, tmp_path):
    """World 2 x accum 1 calibrates each rank on its half of the tokens world 1 x accum 2 reads in two
    batches; the all-reduce adds the same two Hessians, so both ranks write the single process's
    artifact and evaluate it to the same bits (without it the ranks would score different models)."""
    from tests.conftest import pinned_threads
    from tests.test_ddp import torchrun_micro

    gptq = {"gptq": {"calibration_batches": 2}}
    with pinned_threads():  # the ranks run on the same thread count (see torchrun_micro)
        single = run(micro_recipe("train.warmdown_iters=0", "train.grad_accum_steps=2", techniques=gptq),
                     tmp_path / "world1", QUIET)
    out = tmp_path / "world2"
    proc = torchrun_micro(out, "train.grad_accum_steps=1", "techniques.gptq.calibration_batches=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    double = json.loads((out / "result.json").read_text())
    assert double["metrics"]["gptq_calibration_tokens"] == single["metrics"]["gptq_calibration_tokens"] == 1024
    assert stored_tensors((out / "artifact.pga").read_bytes()) == stored_tensors((tmp_path / "world1" / "artifact.pga").read_bytes())
    assert double["val_bpb"] == single["val_bpb"] and double["valid"]

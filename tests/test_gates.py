"""Gated U-Net skips and the three attention output gates: their math, their tensors, and proof
that every path through the model (training loss, evaluation, sliding windows, both kinds of
test-time training) applies them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pgolf.context import RunContext
from pgolf.errors import PgolfError
from pgolf.host import Session
from pgolf.model import GPT, head_gate, model_fields_from_state, unet_skip
from pgolf.optim import split_parameters
from pgolf.recipe import ModelConfig, Recipe
from pgolf.scores import EvalWindows, TokenScores, WindowScorer
from pgolf.testing import micro_recipe
from pgolf_plugins.recurrence import RecurrenceConfig, apply_recurrence, set_loop_passes
from pgolf_plugins.sliding_window import sliding_windows
from pgolf_plugins.ttt import ChunkedSGDScorer, DocumentLoRAScorer, TTTConfig, TTTStats
from tests.conftest import pinned_threads

BOS = 1
VOCAB = 64
SEQ = 32
# 4 layers: encoder 0-1; decoder 2 (one lane, skip 0) and 3 (two lanes, skip 1 joins the attention lane)
BASE = dict(vocab_size=VOCAB, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1,
            parallel_start_layer=3, parallel_variant="two_lane")
GATED = {
    "skip_gates": dict(skip_gates=True),
    "sparse": dict(attn_gate="sparse", attn_gate_scale=0.5),
    "output": dict(attn_gate="output"),
    "output_q": dict(attn_gate="output", attn_gate_src="q"),
    "dense": dict(attn_gate="dense", attn_gate_init_std=0.005),
}


@pytest.fixture(autouse=True)
def _threads():
    with pinned_threads():
        yield


def model_with(seed: int = 0, **fields) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**BASE, **fields}))


def randomised(model: GPT, std: float = 0.1) -> GPT:
    """Every weight (gates included) off its init, so each gate is input dependent and away from 0.5."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


# --- the functional cores against hand-computed values -------------------------------------------


def test_unet_skip_is_the_records_lerp():
    x, skip = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, 4.0]]])
    weight, gate = torch.tensor([2.0, 0.5]), torch.tensor([0.0, math.log(3.0)])  # sigmoid: 0.5, 0.75
    # w*skip = [6, 2]; s*x + (1-s)*w*skip = [0.5*1 + 0.5*6, 0.75*2 + 0.25*2]
    assert torch.allclose(unet_skip(x, skip, weight, gate), torch.tensor([[[3.5, 2.0]]]))
    assert torch.equal(unet_skip(x, skip, weight), torch.tensor([[[7.0, 4.0]]]))  # the baseline: x + w*skip


def test_head_gate_scales_each_head_by_its_sigmoid():
    y = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # [B=1, T=1, H=2, D=2]
    src = torch.tensor([[[math.log(3.0), 5.0, 99.0]]])  # a window of 2 never reads the 99
    weight = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # head 0: sigmoid(ln 3) = 0.75; head 1: sigmoid(0) = 0.5
    assert torch.allclose(head_gate(y, src, weight), torch.tensor([[[[0.75, 1.5], [1.5, 2.0]]]]))
    # the output gate's 2*sigmoid: 1.5 and exactly 1 (identity at W = 0)
    assert torch.allclose(head_gate(y, src, weight, peak=2.0), torch.tensor([[[[1.5, 3.0], [3.0, 4.0]]]]))
    # the sparse gate's scale multiplies the logit: 0.5 * (2 ln 3) = ln 3
    assert torch.allclose(head_gate(y, src, 2 * weight, scale=0.5), head_gate(y, src, weight))


# --- tensors: names, shapes, init, optimizer group, strict load -----------------------------------


@pytest.mark.parametrize(("fields", "name", "shape"), [
    (GATED["skip_gates"], "skip_gates", (2, 32)),  # [num_skip_weights, model_dim] (#1855 train_gpt.py L1227)
    (GATED["sparse"], "blocks.3.attn.attn_gate_w", (2, 12)),  # [heads, GATE_WINDOW] (#1787/#1855 L996)
    (GATED["output"], "blocks.3.attn.attn_gate_proj.weight", (2, 12)),  # CastedLinear(12, heads) (#1667 L653)
    (GATED["dense"], "blocks.3.attn.attn_gate_w", (2, 32)),  # [heads, model_dim] (#1736, #1855 L985)
])
def test_gate_tensors_carry_the_records_names_and_go_to_scalar_adam(fields, name, shape):
    model = model_with(**fields)
    state = model.state_dict()
    assert tuple(state[name].shape) == shape and state[name].dtype == torch.float32
    plain = set(model_with().state_dict())
    assert {k for k in state if k not in plain} == {k for k in state if "gate" in k}  # only gates are added
    groups = split_parameters(model)
    assert any(p is dict(model.named_parameters())[name] for p in groups["scalar"])
    assert not any("gate" in n for n, p in model.named_parameters() if any(p is q for q in groups["matrix"]))
    # a checkpoint with these tensors rebuilds the same model and loads strictly
    rebuilt = GPT(ModelConfig(**{**BASE, **model_fields_from_state(state)}))
    rebuilt.load_state_dict(state, strict=True)


def test_gates_start_where_the_records_start():
    x = torch.randn(2, SEQ, 32)
    plain = model_with().blocks[0].attn
    # output gate: 2*sigmoid(0) = 1, identity; sparse: sigmoid(0) = 0.5, half of every head (proj is linear)
    for fields, factor in ((GATED["output"], 1.0), (GATED["sparse"], 0.5)):
        gated = model_with(**fields).blocks[0].attn
        gated.load_state_dict(plain.state_dict(), strict=False)
        torch.nn.init.normal_(gated.proj.weight)
        plain.proj.weight.data.copy_(gated.proj.weight)
        assert torch.allclose(gated(x), factor * plain(x), atol=1e-6)
    dense = model_with(**GATED["dense"]).blocks[0].attn.attn_gate_w
    assert abs(dense.std().item() - 0.005) < 0.001  # N(0, 0.005): #1736's GATED_ATTN_INIT_STD
    assert torch.count_nonzero(model_with(**GATED["skip_gates"]).skip_gates) == 0


@pytest.mark.parametrize("lane_start", [-1, 3], ids=["one_lane", "two_lanes"])
def test_skip_gates_open_keep_x_and_closed_take_the_skip(lane_start):
    """sigmoid(+30) ~ 1 keeps x (as if the skip weight were 0); sigmoid(-30) ~ 0 replaces x by w*skip."""
    ids = torch.randint(0, VOCAB, (2, SEQ))
    gated = randomised(model_with(skip_gates=True, parallel_start_layer=lane_start))
    ungated = model_with(parallel_start_layer=lane_start)
    ungated.load_state_dict(gated.state_dict(), strict=False)
    with torch.no_grad():
        gated.skip_gates.fill_(30.0)
        ungated.skip_weights.zero_()
        assert torch.allclose(gated.forward_hidden(ids), ungated.forward_hidden(ids), atol=1e-5)
        gated.skip_gates.fill_(-30.0)
        assert not torch.allclose(gated.forward_hidden(ids), ungated.forward_hidden(ids), atol=1e-2)


def test_growing_the_skips_keeps_the_trained_ones():
    model = model_with(skip_gates=True)
    with torch.no_grad():
        model.skip_gates.fill_(0.25)
    model.grow_skips(5)
    assert model.skip_weights.shape == model.skip_gates.shape == (5, 32)
    assert torch.all(model.skip_gates[:2] == 0.25) and torch.all(model.skip_gates[2:] == 0)
    assert torch.all(model.skip_weights == 1)


def test_depth_recurrence_gates_every_skip_of_the_longer_loop():
    """Looping blocks 1-2 three times: 8 virtual layers, 4 skips (#1855: skip_gates sized like skip_weights)."""
    model = model_with(skip_gates=True)
    cfg = RecurrenceConfig(loop_start=1, loop_end=2, num_loops=2)
    apply_recurrence(model, cfg)
    set_loop_passes(model, cfg, cfg.num_loops)
    assert model.skip_gates.shape == model.skip_weights.shape == (4, 32)
    model = randomised(model)  # off the zero-init projections, so a skip differs from the stream it joins
    ids = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        before = model.forward_hidden(ids)
        model.skip_gates[3].fill_(5.0)  # the last skip's gate reaches the output
        assert (model.forward_hidden(ids) - before).abs().max() > 1e-3


# --- every path applies the gate -----------------------------------------------------------------


def reference_nll(model: GPT, tokens: np.ndarray, windows: EvalWindows) -> np.ndarray:
    """Per-target NLL straight from model.token_nll, window by window (index = target position)."""
    out = np.full(tokens.shape[0], np.nan)
    with torch.no_grad():
        for start, length, first in zip(windows.starts, windows.lengths, windows.score_from, strict=True):
            chunk = torch.from_numpy(tokens[start : start + length + 1]).long()[None]
            nll = model.token_nll(chunk[:, :-1], chunk[:, 1:])[0].numpy()
            out[start + 1 + first : start + 1 + length] = nll[first:]
    return out


def scored(scorer, model: GPT, tokens: np.ndarray, windows: EvalWindows, ctx: RunContext) -> tuple[np.ndarray, EvalWindows]:
    scores = TokenScores.empty(tokens, np.ones(tokens.shape[0], dtype=np.int32))
    windows = scorer.windows_for(windows, tokens, ctx)
    scores.windows = windows
    scorer(model, scores, windows, ctx)
    out = np.full(tokens.shape[0], np.nan)
    out[1:] = scores.nll[1:]
    return out, windows


def stream(n_tokens: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    out: list[int] = []
    for length in (150, 90, 200, 60, 110):
        out += [BOS, *rng.integers(2, VOCAB, size=length - 1).tolist()]
    return np.array(out[:n_tokens], dtype=np.int64)


PATHS = {
    "sliding_window": lambda: WindowScorer(),
    "ttt_sgd": lambda: ChunkedSGDScorer(TTTConfig(lr=0.0, chunk_tokens=128), TTTStats("sgd")),
    "ttt_lora": lambda: DocumentLoRAScorer(TTTConfig(mode="lora", lora_rank=4, lora_chunk=16, lora_lr=0.0,
                                                     lora_weight_decay=0.0, lora_batch_docs=2), TTTStats("lora")),
}


@pytest.mark.parametrize("kind", list(GATED))
def test_every_path_applies_the_gate(kind):
    """Each path's per-token scores equal the gated forward's own, and the gate moves them.

    The test-time trainers run at learning rate 0 (the weights stay put), so a path that ran
    attention without the gate (as #1787's first TTT code did: post-TTT 1.908) would reproduce the
    ungated model's scores instead of the gated one's.
    """
    gated = randomised(model_with(**GATED[kind]))
    ungated = model_with()
    unexpected = ungated.load_state_dict(gated.state_dict(), strict=False).unexpected_keys
    assert unexpected and all("gate" in k for k in unexpected)
    ungated.eval()
    tokens = stream(600)
    ids = torch.from_numpy(tokens[: 4 * SEQ + 1]).long()
    x, y = ids[:-1].reshape(4, SEQ), ids[1:].reshape(4, SEQ)
    with torch.no_grad():  # the training loss and the probes' log-probabilities are the same forward
        loss = gated.train()(x, y)
        assert torch.allclose(loss, gated.eval().token_nll(x, y).mean(), atol=1e-6)
        logp = gated.log_probs(x).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(-logp, gated.token_nll(x, y), atol=1e-5)
        assert (gated.token_nll(x, y) - ungated.token_nll(x, y)).abs().max() > 1e-3
    recipe = Recipe(model=ModelConfig(**BASE))
    recipe.train.seq_len, recipe.eval.batch_tokens = SEQ, 4 * SEQ
    ctx = RunContext(recipe=recipe, device=torch.device("cpu"))
    for path, make in PATHS.items():
        got, windows = scored(make(), gated, tokens, sliding_windows(tokens.shape[0], SEQ, 8), ctx)
        want = reference_nll(gated, tokens, windows)
        without = reference_nll(ungated, tokens, windows)
        assert np.allclose(got[1:], want[1:], atol=1e-5), path
        assert np.abs(want[1:] - without[1:]).max() > 1e-3, path


# --- recipes: the techniques, their exclusivity and their checks ----------------------------------


@pytest.mark.parametrize(("name", "fields"), [
    ("skip_gates", {"skip_gates": True}),
    ("sparse_attn_gate", {"attn_gate": "sparse", "attn_gate_window": 12, "attn_gate_scale": 0.5,
                          "attn_gate_init_std": 0.0}),  # #1855 README: SPARSE_ATTN_GATE_SCALE=0.5, GATE_WINDOW=12
    ("attn_out_gate", {"attn_gate": "output", "attn_gate_window": 12, "attn_gate_src": "proj"}),  # #1667 README
    ("gated_attn", {"attn_gate": "dense", "attn_gate_init_std": 0.005}),  # #1736 README: GATED_ATTN_INIT_STD=0.005
])
def test_each_technique_configures_the_records_model(name, fields):
    model = Session(micro_recipe(techniques={name: {}})).recipe.model
    assert {k: getattr(model, k) for k in fields} == fields


@pytest.mark.parametrize(("a", "b"), [("sparse_attn_gate", "gated_attn"), ("attn_out_gate", "sparse_attn_gate"),
                                      ("gated_attn", "attn_out_gate")])
def test_two_attention_gates_are_one_error_naming_both(a, b):
    with pytest.raises(PgolfError, match=f"'{a}' and '{b}' conflict|'{b}' and '{a}' conflict"):
        Session(micro_recipe(techniques={a: {}, b: {}}))


def test_a_window_wider_than_the_model_is_a_config_error():
    with pytest.raises(PgolfError, match="attn_gate_window .*must lie in \\[1, 64\\], got 100"):
        Session(micro_recipe(techniques={"sparse_attn_gate": {"gate_window": 100}}))
    with pytest.raises(PgolfError, match="gate_window must be at least 1"):
        Session(micro_recipe(techniques={"attn_out_gate": {"gate_window": 0}}))

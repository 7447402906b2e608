"""EMA / SWA: the averaging math, its dtypes, the SWA rule, and that export sees the average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.api import Technique
from pgolf.errors import ConfigError
from pgolf.host import run
from pgolf.registry import resolve
from pgolf.reporter import Reporter
from pgolf_plugins.ema import ExponentialAverage, SnapshotAverage, float_state, load_average, swa_collects

M = "tests.test_ema"
QUIET = Reporter(quiet=True)


def test_a_constant_stream_averages_to_itself():
    w = torch.randn(5, 3)
    ema = ExponentialAverage({"w": w}, decay=0.9)
    for _ in range(50):
        ema.update()
    assert torch.equal(ema.average()["w"], w)


def test_a_step_decays_geometrically():
    w0, w1 = torch.randn(4, 4), torch.randn(4, 4)
    live = w0.clone()
    ema = ExponentialAverage({"w": live}, decay=0.97)
    live.copy_(w1)  # the first optimizer step moves the weights from w0 to w1 for good
    for n in range(1, 40):
        ema.update()
        torch.testing.assert_close(ema.average()["w"], w1 + 0.97**n * (w0 - w1), rtol=1e-5, atol=1e-6)


def test_the_shadow_stays_fp32_and_loading_restores_the_dtype():
    model = nn.Linear(8, 8).to(torch.bfloat16)
    live = float_state(model)
    ema = ExponentialAverage(live, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    expected = ema.average()["weight"].to(torch.bfloat16)
    load_average(live, ema.average())
    assert model.weight.dtype == torch.bfloat16 and torch.equal(model.weight, expected)


def test_swa_collects_exactly_the_records_steps_and_averages_them():
    schedule = [(step, 1.0 if step <= 60 else (100 - step) / 40) for step in range(1, 101)]
    chosen = [step for step, scale in schedule if swa_collects(step, scale, every=10, start_scale=0.5)]
    assert chosen == [90, 100]  # scale < 0.5 from step 81, every 10th step
    live = torch.zeros(3)
    swa = SnapshotAverage({"w": live})
    snapshots = []
    for step, scale in schedule:
        live.fill_(float(step))
        if swa_collects(step, scale, every=10, start_scale=0.5):
            swa.collect()
            snapshots.append(live.clone())
    torch.testing.assert_close(swa.average()["w"], torch.stack(snapshots).mean(0))


def test_swa_keeps_the_raw_weights_below_two_snapshots():
    swa = SnapshotAverage({"w": torch.ones(2)})
    assert swa.average() is None
    swa.collect()
    assert swa.average() is None


def test_blend_mixes_averaged_and_raw_weights():
    raw, avg = torch.tensor([0.0, 4.0]), torch.tensor([2.0, 0.0])
    for blend, expected in ((1.0, avg), (0.0, raw), (0.25, torch.tensor([0.5, 3.0]))):
        live = raw.clone()
        load_average({"w": live}, {"w": avg}, blend)
        assert torch.equal(live, expected)


@pytest.mark.parametrize("params, key", [({"decay": 1.0}, "decay"), ({"blend": 1.5}, "blend"),
                                         ({"mode": "lawa"}, "mode"), ({"swa_every": 0}, "swa_every")])
def test_bad_settings_name_their_key(params, key):
    with pytest.raises(ConfigError, match=f"techniques.ema.{key}"):
        resolve({"ema": params})


# --- in a run --------------------------------------------------------------------------------


class WeightProbe(Technique):
    """Records the weights at train start, after every step, and as export receives them."""

    name = "weight_probe"
    after = ("ema", "recurrence")
    seen: dict[str, object] = {}

    def pgolf_on_train_start(self, model, ctx):
        WeightProbe.seen = {"start": _copy(model), "steps": [], "plans": []}

    def pgolf_on_step_end(self, model, ctx):
        WeightProbe.seen["steps"].append(_copy(model))
        WeightProbe.seen["plans"].append(model.looping_active)

    def pgolf_on_export_start(self, model, ctx):
        WeightProbe.seen["export"] = _copy(model)
        ema = ctx.stash.get("ema")
        WeightProbe.seen["shadow"] = {k: v.clone() for k, v in ema.average().items()} if ema else None


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in float_state(model).items()}


def test_export_sees_the_ema_weights(micro_recipe, tmp_path):
    run(micro_recipe(techniques={"ema": {"decay": 0.6}, f"{M}:WeightProbe": {}}), tmp_path, QUIET)
    seen = WeightProbe.seen
    raw = seen["steps"][-1]
    assert set(seen["export"]) == set(seen["shadow"]) == set(raw)
    for name, shadow in seen["shadow"].items():
        assert torch.equal(seen["export"][name], shadow), name
    assert any(not torch.equal(seen["export"][n], raw[n]) for n in raw)  # the average, not the last step
    saved = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert all(torch.equal(saved[n], seen["export"][n]) for n in raw)  # the checkpoint holds it too


def test_ema_runs_on_through_loop_activation(micro_recipe, tmp_path):
    """The EMA is never reset when looping switches on: export equals the average over every step."""
    decay = 0.7
    techniques = {"ema": {"decay": decay}, f"{M}:WeightProbe": {},
                  "recurrence": {"loop_start": 0, "loop_end": 1, "num_loops": 1, "enable_at": 0.5, "untie_mlp": True}}
    run(micro_recipe("train.iterations=6", techniques=techniques), tmp_path, QUIET)
    seen = WeightProbe.seen
    assert seen["plans"] == [False, False, False, True, True, True]
    expected = {k: v.clone() for k, v in seen["start"].items()}
    for state in seen["steps"]:
        for k, v in expected.items():
            v.lerp_(state[k], 1.0 - decay)
    for name, value in expected.items():
        torch.testing.assert_close(seen["export"][name], value, rtol=0, atol=1e-7, msg=name)


def test_swa_mode_applies_the_snapshot_mean(micro_recipe, tmp_path):
    techniques = {"ema": {"mode": "swa", "swa_every": 2, "swa_start_scale": 2.0}, f"{M}:WeightProbe": {}}
    result = run(micro_recipe("train.iterations=4", techniques=techniques), tmp_path, QUIET)
    seen = WeightProbe.seen
    assert result["metrics"]["averaging"] == {"mode": "swa", "averaged": 2, "blend": 1.0, "applied": True}
    for name, value in seen["export"].items():
        torch.testing.assert_close(value, (seen["steps"][1][name] + seen["steps"][3][name]) / 2, rtol=0, atol=1e-7)

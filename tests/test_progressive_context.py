"""Progressive context growth (#2014): schedule parsing, the stage and LR re-warmup rule against values
worked by hand from #2014's code, and the loop running each stage's sequence length."""

from __future__ import annotations

import pytest
from torch import Tensor, nn

from pgolf.errors import ConfigError
from pgolf.host import Session, load_data, loop_hooks, new_model
from pgolf.loop import train
from pgolf.registry import resolve
from pgolf.reporter import Reporter
from pgolf_plugins.progressive_context import (
    ContextGrowth,
    parse_schedule,
    rewarm_factor,
    schedule_problems,
    stage_seq_len,
)
from tests.conftest import pinned_threads

QUIET = Reporter(quiet=True)
# #2014 README.md (run command) and train_gpt.py:241-244: TRAIN_SEQ_SCHEDULE, SEQ_CHANGE_WARMUP_STEPS=32
RECORD_SCHEDULE = "1024@0.100,2048@0.700,3072@1.000"


def test_schedule_parses_as_the_record_does():
    assert parse_schedule(RECORD_SCHEDULE) == [(0.1, 1024), (0.7, 2048), (1.0, 3072)]
    # sorted by progress; a last stage short of 1 holds to the end (#2014 parse_train_seq_schedule)
    assert parse_schedule(" 2048@0.7 ,1024@0.1,") == [(0.1, 1024), (0.7, 2048), (1.0, 2048)]
    for bad in ("1024", "1024@0", "1024@1.5", "0@0.5", "x@0.5", ""):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ConfigError, match="schedule"):
        resolve({"progressive_context": {"schedule": "1024@0.1,2048"}})


def test_a_stage_holds_while_progress_is_at_most_its_bound():
    stages = parse_schedule(RECORD_SCHEDULE)
    got = [stage_seq_len(stages, p) for p in (0.0, 0.05, 0.1, 0.1001, 0.7, 0.7001, 1.0)]
    assert got == [1024, 1024, 1024, 2048, 2048, 3072, 3072]


def test_lr_rewarms_linearly_over_32_steps_after_each_change():
    # #2014 seed 42's log: growth_stage:seq_len:2048 at step 646, rewarmup over 32 steps;
    # factor = min(max((step - 646 + 1) / 32, 0), 1) (train_gpt.py:4230-4241)
    assert rewarm_factor(646, 646, 32) == 1 / 32
    assert rewarm_factor(660, 646, 32) == 15 / 32
    assert rewarm_factor(677, 646, 32) == 1.0
    growth = ContextGrowth(parse_schedule(RECORD_SCHEDULE), rewarm_steps=32)
    assert growth.advance(0, 0.0) == (1024, 1.0, True)  # the first stage at step 0: no re-warmup
    assert growth.advance(645, 0.0999) == (1024, 1.0, False)
    assert growth.advance(646, 0.1003) == (2048, 1 / 32, True)
    assert growth.advance(647, 0.1005) == (2048, 2 / 32, False)
    factors = [growth.advance(step, 0.2)[1] for step in range(648, 679)]
    assert factors[-3:] == [31 / 32, 1.0, 1.0] and growth.rewarm_from is None
    assert [c["seq_len"] for c in growth.changes] == [1024, 2048]


def test_every_stage_must_cut_the_micro_batch_into_whole_pieces():
    # #2014: 786,432 tokens over 8 ranks = 98,304 per micro-batch, which 1024, 2048 and 3072 divide
    assert schedule_problems(parse_schedule(RECORD_SCHEDULE), 98_304) == []
    assert "2048, 3072" in schedule_problems(parse_schedule(RECORD_SCHEDULE), 1024)[0]


class Recording(nn.Module):
    """The model as the loop calls it, recording each batch's shape and document cap."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[tuple[int, ...], int | None]] = []

    def forward(self, x: Tensor, y: Tensor, **kw: int) -> Tensor:
        self.calls.append((tuple(x.shape), kw.get("max_doc_len")))
        return self.model(x, y, **kw)


@pytest.mark.parametrize("isolated", [False, True])
def test_the_loop_runs_each_stage_and_warms_every_length(isolated, micro_recipe):
    techniques = {"progressive_context": {"schedule": "32@0.5,64@1.0", "rewarm_steps": 2}}
    if isolated:
        techniques["doc_isolation"] = {}
    recipe = micro_recipe("train.warmup_steps=1", techniques=techniques)
    session = Session(recipe, reporter=QUIET)
    load_data(session)
    assert session.recipe.train.seq_len == 64  # the longest stage is the model's context
    model = new_model(session)
    optimizers = session.hook.pgolf_provide_optimizers(model=model, ctx=session.ctx)
    recording = Recording(model)
    lrs: list[float] = []
    hooks = loop_hooks(session)
    step_end = hooks.step_end
    hooks.step_end = lambda m: (lrs.append(session.ctx.clock.lr_scale), step_end(m))
    with pinned_threads():
        train(model, recording, optimizers, session.data, session.ctx, hooks)
    # warmup at the final length, then the other stage; steps at fractions 0, 1/3 and 2/3
    lengths = [64, 32, 32, 32, 64]
    if isolated:  # one packed row per micro-batch, documents cut at the stage length
        assert recording.calls == [((1, 1024), n) for n in lengths]
    else:
        assert recording.calls == [((1024 // n, n), None) for n in lengths]
    # tiny's step-matched warmdown (60 iterations) times the re-warmup: 1/2 at the change step 2
    assert lrs == pytest.approx([3 / 60, 2 / 60, 1 / 60 * 0.5])


def test_a_micro_batch_the_stages_do_not_divide_is_a_config_error(micro_recipe):
    recipe = micro_recipe(techniques={"progressive_context": {"schedule": "48@0.5,64@1.0"}})
    with pytest.raises(ConfigError, match="48"):
        Session(recipe, reporter=QUIET)

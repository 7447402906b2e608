"""The ablation table from stored runs: statistics per arm, honesty warnings, every output format."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console

from pgolf.study import stats
from pgolf.study.report import analyse, render_csv, render_json, render_markdown, render_table, table_rows

SEEDS = (42, 314, 999)


def stored_run(on: tuple[str, ...], seed: int, bpb: float, *, steps: int = 500, tokenizer: str = "tok1",
               val_bytes: int = 196_652, scored: int | None = None, total: int = 15_000_000,
               valid: bool = True) -> dict:
    result = {"val_bpb": bpb, "tokens_per_byte": 0.40945, "bytes_total": total, "steps": steps, "train_seconds": 600.0,
              "eval_seconds": 80.0, "valid": valid, "failed_audits": [] if valid else ["causality"],
              "val_bytes": scored or val_bytes, "val_partial": False, "export": {"budget_bytes": 16_000_000},
              "data": {"tokenizer_sha256": tokenizer, "val_bytes_total": val_bytes}}
    return {"arm": "+".join(on) or "none", "toggles_on": list(on), "seed": seed, "status": "ok", "result": result}


def failed_run(on: tuple[str, ...], seed: int) -> dict:
    return {"arm": "+".join(on) or "none", "toggles_on": list(on), "seed": seed, "status": "failed",
            "failed_stage": "train", "error": "TrainingError: training loss became nan"}


def make_summary(runs: list[dict], arms: list[tuple[str, ...]], design: str = "factorial",
                 toggles: tuple[str, ...] = ("ema", "sliding_window")) -> dict:
    summary = {
        "spec": {"recipe": "recipes/baseline.yaml"}, "toggles": list(toggles), "design": design,
        "technique_names": {t: t for t in toggles}, "baseline": "+".join(arms[0]) or "none",
        "arms": [{"id": "+".join(a) or "none", "label": " + ".join(a) or "(none)", "on": list(a)} for a in arms],
        "counts": {s: {"ran": 0, "reused": 0} for s in ("train", "export", "eval")}, "runs": runs,
    }
    summary["statistics"] = analyse(summary)
    return summary


FACTORIAL = [(), ("ema",), ("sliding_window",), ("ema", "sliding_window")]
SCORES = {(): [1.2244, 1.2251, 1.2239], ("ema",): [1.2231, 1.2236, 1.2229],
          ("sliding_window",): [1.1925, 1.1931, 1.1922], ("ema", "sliding_window"): [1.1913, 1.1917, 1.1910]}


def clean_study() -> dict:
    runs = [stored_run(on, seed, bpb) for on, values in SCORES.items() for seed, bpb in zip(SEEDS, values, strict=True)]
    return make_summary(runs, FACTORIAL)


def arm(summary: dict, arm_id: str) -> dict:
    return next(a for a in summary["statistics"]["arms"] if a["id"] == arm_id)


def test_every_variant_is_compared_with_the_baseline_arm():
    summary = clean_study()
    assert summary["statistics"]["warnings"] == []
    base = arm(summary, "none")
    assert "comparison" not in base and base["n"] == 3
    ps = []
    for on in FACTORIAL[1:]:
        a = arm(summary, "+".join(on))
        expected = stats.compare(SCORES[on], SCORES[()], tokens_per_byte=0.40945)
        assert a["comparison"]["p_value"] == pytest.approx(expected.p_value)
        assert a["comparison"]["delta"] == pytest.approx(expected.delta)
        assert a["comparison"]["paired"]["n"] == 3
        ps.append(expected.p_value)
    assert [arm(summary, "+".join(on))["comparison"]["holm_p"] for on in FACTORIAL[1:]] == pytest.approx(stats.holm(ps))
    effects = summary["statistics"]["effects"]
    assert effects["kind"] == "factorial" and [e["name"] for e in effects["main"]] == ["ema", "sliding_window"]
    assert effects["interactions"][0]["name"] == "ema x sliding_window"


def test_failed_seeds_are_counted_not_hidden():
    runs = [stored_run(on, s, b) for on, values in SCORES.items() for s, b in zip(SEEDS, values, strict=True)
            if not (on == ("ema",) and s == 314)]
    runs.append(failed_run(("ema",), 314))
    summary = make_summary(runs, FACTORIAL)
    ema = arm(summary, "ema")
    assert ema["n"] == 2 and ema["launched"] == [42, 999, 314] and ema["failed"][0]["stage"] == "train"
    assert ema["comparison"]["n_new"] == 2 and ema["comparison"]["paired"] is None  # seeds no longer match
    assert any("ema: seed(s) 314 failed; its statistics use 2 of 3 launched seeds" in w
               for w in summary["statistics"]["warnings"])
    assert "2/3 (1 FAILED)" in table_rows(summary["statistics"])[1][1]


@pytest.mark.parametrize(("changes", "message"), [
    ({"steps": 480}, "arms differ in step counts"),
    ({"tokenizer": "tok2"}, "different tokenizers"),
    ({"val_bytes": 150_000}, "different validation sets"),
    ({"scored": 196_600}, "arms scored 196,600 to 196,652 of the validation set's 196,652 bytes"),
    ({"total": 16_000_001}, "over the 16,000,000-byte budget"),
    ({"valid": False}, "failed validity audits (causality)"),
])
def test_warnings_when_arms_are_not_comparable(changes, message):
    runs = [stored_run(on, s, b, **(changes if on == ("ema",) else {}))
            for on, values in SCORES.items() for s, b in zip(SEEDS, values, strict=True)]
    warnings = make_summary(runs, FACTORIAL)["statistics"]["warnings"]
    assert any(message in w for w in warnings), warnings


def test_leave_one_out_reports_each_contribution_at_the_full_stack():
    arms = [(), ("ema", "sliding_window"), ("sliding_window",), ("ema",)]
    runs = [stored_run(on, s, b) for on in arms for s, b in zip(SEEDS, SCORES[on], strict=True)]
    summary = make_summary(runs, arms, design="leave-one-out")
    contributions = summary["statistics"]["effects"]["contributions"]
    ema = next(c for c in contributions if c["toggle"] == "ema")
    expected = stats.compare(SCORES[("ema", "sliding_window")], SCORES[("sliding_window",)], tokens_per_byte=0.40945)
    assert ema["p_value"] == pytest.approx(expected.p_value) and ema["delta"] == pytest.approx(expected.delta)


def test_formats_carry_the_same_numbers():
    summary = clean_study()
    rows = list(csv.DictReader(io.StringIO(render_csv(summary))))
    assert [r["arm"] for r in rows] == ["none", "ema", "sliding_window", "ema+sliding_window"]
    sw = arm(summary, "sliding_window")["comparison"]
    assert float(rows[2]["p_value"]) == pytest.approx(sw["p_value"]) and rows[2]["practice"] == "True"
    data = json.loads(render_json(summary))
    assert data["arms"][2]["comparison"]["p_value"] == pytest.approx(sw["p_value"]) and data["counts"]
    md = render_markdown(summary)
    assert md.splitlines()[0].startswith("| arm | seeds | val_bpb mean ± std | Δ bpb [95% CI] |")
    assert rows[2]["paired_p_value"] and "| paired p |" in md.splitlines()[0]
    assert "| main: sliding_window |" in md and "p<0.25" in md
    console = Console(width=220, record=True)
    for renderable in render_table(summary):
        console.print(renderable)
    text = console.export_text()
    assert "sliding_window" in text and "(baseline)" in text and "interaction: ema x sliding_window" in text
    assert f"{arm(summary, 'ema+sliding_window')['bytes_max']:,}" in text


@pytest.mark.parametrize("content", [b"{not json", b'{"runs": 3}', b"\xff\xfe"])
def test_a_damaged_summary_is_one_clear_error_not_a_traceback(tmp_path, content):
    from typer.testing import CliRunner

    from pgolf.cli import app

    (tmp_path / "summary.json").write_bytes(content)
    outcome = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert outcome.exit_code == 2
    assert "summary.json is damaged" in outcome.output and "pgolf ablate" in outcome.output
    assert "Traceback" not in outcome.output

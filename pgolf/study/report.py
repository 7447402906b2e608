"""The ablation's statistics and its table: every variant against the baseline arm, by both conventions.

`analyse` turns the runs stored in an ablation's summary into per-arm figures, the tests of
`pgolf.stats` for each variant (Holm-adjusted across variants), factorial effects or
leave-one-out contributions, and the warnings that keep a comparison honest (failed seeds,
differing step counts, tokenizers or validation bytes). The renderers draw the same numbers as
a Rich table, Markdown, CSV or JSON, and optionally a plot. Nothing here imports torch, so
`pgolf report` re-renders a finished ablation instantly.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from pgolf.errors import ConfigError, DataError
from pgolf.study import stats

FORMATS = ("table", "md", "csv", "json")
BUDGET_BYTES = 16_000_000


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _arm_figures(arm: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    results = [r["result"] for r in ok]
    values = [res["val_bpb"] for res in results]
    budget = max((res.get("export", {}).get("budget_bytes", BUDGET_BYTES) for res in results), default=BUDGET_BYTES)
    bytes_max = max((res["bytes_total"] for res in results), default=None)
    return {
        "id": arm["id"],
        "label": arm["label"],
        "on": arm["on"],
        "launched": [r["seed"] for r in runs],
        "finished": [r["seed"] for r in ok],
        "failed": [{"seed": r["seed"], "stage": r.get("failed_stage"), "error": r.get("error")}
                   for r in runs if r["status"] == "failed"],
        "pending": [r["seed"] for r in runs if r["status"] == "pending"],
        "val_bpb": {str(r["seed"]): r["result"]["val_bpb"] for r in ok},
        "n": len(values),
        "mean": _mean(values),
        "std": stats.sample_std(values) if len(values) > 1 else None,
        "bytes_max": bytes_max,
        "budget_bytes": budget,
        "over_budget": bytes_max is not None and bytes_max > budget,
        "train_seconds": _mean([res["train_seconds"] for res in results]),
        "eval_seconds": _mean([res["eval_seconds"] for res in results]),
        "steps": sorted({res["steps"] for res in results}),
        "tokens_per_byte": _mean([res["tokens_per_byte"] for res in results]),
        "invalid": [{"seed": r["seed"], "failed_audits": r["result"].get("failed_audits", [])}
                    for r in ok if not r["result"].get("valid", True)],
    }


def _tokens_per_byte(*arms: dict[str, Any]) -> float | None:
    values = [a["tokens_per_byte"] for a in arms if a["tokens_per_byte"]]
    return float(np.mean(values)) if values else None


def _compare(new: dict[str, Any], old: dict[str, Any]) -> stats.Comparison:
    new_by_seed = {int(s): v for s, v in new["val_bpb"].items()}
    old_by_seed = {int(s): v for s, v in old["val_bpb"].items()}
    return stats.compare(list(new_by_seed.values()), list(old_by_seed.values()),
                         tokens_per_byte=_tokens_per_byte(new, old), new_by_seed=new_by_seed, old_by_seed=old_by_seed)


def analyse(summary: dict[str, Any]) -> dict[str, Any]:
    """Statistics of every variant against the baseline arm, from the runs recorded in a summary."""
    runs = summary["runs"]
    arms = [_arm_figures(a, [r for r in runs if r["arm"] == a["id"]]) for a in summary["arms"]]
    by_id = {a["id"]: a for a in arms}
    baseline = by_id[summary["baseline"]]
    variants = [a for a in arms if a is not baseline]
    for arm in variants:
        arm["comparison"] = _compare(arm, baseline).to_dict()
    for field_name, holm_name in (("p_value", "holm_p"), ("p_value_margin", "holm_p_margin")):
        ps = [a["comparison"][field_name] for a in variants]
        adjusted = stats.holm([math.nan if p is None else p for p in ps])
        for arm, p in zip(variants, adjusted, strict=True):
            arm["comparison"][holm_name] = stats.json_safe(p)
    for arm in variants:
        c = arm["comparison"]
        c["verdicts_holm"] = stats.verdicts(_nan(c["holm_p"]), None if c["p_value_margin"] is None
                                            else _nan(c["holm_p_margin"]))
    return stats.json_safe({
        "baseline": baseline["id"],
        "conventions": {
            "practice": f"one-sided Welch t-test (H1: variant's val_bpb lower), p < {stats.PRACTICE_ALPHA}, no margin",
            "rule": f"the same test with a {stats.RULE_MARGIN_NATS}-nat margin (converted with the runs' tokens "
                    f"per byte), p < {stats.RULE_ALPHA}",
            "scipy": stats.SCIPY_CALL,
            "seeds_needed": f"seeds per arm for power {stats.POWER} at alpha {stats.POWER_ALPHA} (one-sided), "
                            "observed delta and pooled sigma",
        },
        "arms": arms,
        "effects": _effects(summary, arms),
        "warnings": _warnings(arms, runs) + _stopped(summary.get("stopped_when_decided")),
    })


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _effects(summary: dict[str, Any], arms: list[dict[str, Any]]) -> dict[str, Any] | None:
    toggles = summary["toggles"]
    names = summary.get("technique_names", {})
    if summary["design"] == "factorial" and len(toggles) > 1:
        cells = {frozenset(a["on"]): {int(seed): v for seed, v in a["val_bpb"].items()} for a in arms}
        effects = stats.factorial_effects(cells, toggles)
        for group in ("main", "interactions"):
            for e in effects.get(group, []):
                e["name"] = " x ".join(names.get(t, t) for t in e["name"].split(" x "))
        return {"kind": "factorial", **effects}
    if summary["design"] == "leave-one-out":
        full = next((a for a in arms if set(a["on"]) == set(toggles)), None)
        rows = []
        for t in toggles:
            without = next((a for a in arms if set(a["on"]) == set(toggles) - {t}), None)
            if full is not None and without is not None:
                rows.append({"toggle": t, "name": names.get(t, t), **_compare(full, without).to_dict()})
        return {"kind": "leave-one-out", "contributions": rows}
    return None


def _describe_steps(arms: list[dict[str, Any]]) -> str:
    parts = []
    for a in arms:
        if a["steps"]:
            s = a["steps"]
            parts.append(f"{a['label']} {s[0]}" + (f"-{s[-1]}" if len(s) > 1 else ""))
    return ", ".join(parts)


def _stopped(stopped: dict[str, Any] | None) -> list[str]:
    """A study stopped early (--stop-when-decided) says so wherever its table is rendered."""
    if stopped is None:
        return []
    return [f"stopped when decided: {stopped['rule']}; skipped: {', '.join(stopped['skipped']) or 'none'}"]


def _warnings(arms: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for a in arms:
        if a["failed"]:
            seeds = ", ".join(str(f["seed"]) for f in a["failed"])
            out.append(f"{a['label']}: seed(s) {seeds} failed; its statistics use {a['n']} of "
                       f"{len(a['launched'])} launched seeds")
        if a["pending"]:
            out.append(f"{a['label']}: seed(s) {', '.join(map(str, a['pending']))} not finished yet")
        if 0 < a["n"] < 2:
            out.append(f"{a['label']}: one finished seed cannot be tested; run more seeds")
        if a["invalid"]:
            out.append(f"{a['label']}: seed(s) {', '.join(str(i['seed']) for i in a['invalid'])} failed validity "
                       f"audits ({', '.join(sorted({x for i in a['invalid'] for x in i['failed_audits']}))})")
        if a["over_budget"]:
            out.append(f"{a['label']}: artifact of {a['bytes_max']:,} bytes is over the {a['budget_bytes']:,}-byte budget")
    results = [r["result"] for r in runs if r["status"] == "ok"]
    if len({res["steps"] for res in results}) > 1:
        out.append(f"arms differ in step counts ({_describe_steps(arms)}): wallclock-capped runs on different "
                   "hardware or at different step costs train different amounts; pass --steps N to compare "
                   "step-matched runs")
    tokenizers = {res.get("data", {}).get("tokenizer_sha256") for res in results} - {None}
    if len(tokenizers) > 1:
        out.append(f"runs used {len(tokenizers)} different tokenizers: val_bpb stays comparable (original bytes), "
                   "but tokens per byte differ, so the nats figures and the 0.005-nat margin mix conventions")
    totals = {res.get("data", {}).get("val_bytes_total") for res in results} - {None}
    scored = sorted({res["val_bytes"] for res in results})
    if len(totals) > 1:
        out.append(f"runs used different validation sets ({', '.join(f'{t:,}' for t in sorted(totals))} bytes): "
                   "their scores are not comparable")
    elif len(scored) > 1:
        out.append(f"arms scored {scored[0]:,} to {scored[-1]:,} of the validation set's "
                   f"{next(iter(totals), scored[-1]):,} bytes: their windows cover it differently (plain windows "
                   "drop the stream's tail, sliding windows score it); val_bpb stays a per-byte figure")
    if results and any(res.get("val_partial") for res in results):
        out.append("scores cover only part of the validation set (eval.max_tokens): fine for a comparison, "
                   "not a leaderboard number")
    return out


# --- rendering ----------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 5, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<1e-4" if value < 1e-4 else f"{value:.3g}"


def _mark(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def _seeds(arm: dict[str, Any]) -> str:
    text = f"{arm['n']}/{len(arm['launched'])}"
    if arm["failed"]:
        text += f" ({len(arm['failed'])} FAILED)"
    if arm["pending"]:
        text += f" ({len(arm['pending'])} pending)"
    return text


COLUMNS = ("arm", "seeds", "val_bpb mean ± std", "Δ bpb [95% CI]", "Δ nats", "p", "Holm p", "paired p", "p<0.25",
           "rule", "seeds@80%", "max bytes", "train s", "eval s")
LEGEND = ("p: one-sided Welch t-test of per-seed val_bpb, H1: the arm is lower than the baseline; Holm p: adjusted "
          "across arms; paired p: the same hypothesis tested on seed-matched differences (when both arms ran the "
          "same seeds); p<0.25: the leaderboard's practice (Welch, no margin); rule: the written rule, Welch p<0.01 "
          "beating the baseline by 0.005 nats (converted with the runs' tokens per byte); seeds@80%: seeds per arm "
          "for the Welch test to detect this Δ at this σ with power 0.8 at α 0.01")


def table_rows(statistics: dict[str, Any], ci_sep: str = " ") -> list[list[str]]:
    """One row per arm; `ci_sep` goes between Δ and its interval (a newline keeps terminal tables narrow)."""
    rows = []
    for arm in statistics["arms"]:
        c = arm.get("comparison")
        mean = "-" if arm["mean"] is None else f"{arm['mean']:.5f} ± {_f(arm['std'])}"
        bytes_text = "-" if arm["bytes_max"] is None else f"{arm['bytes_max']:,}" + (" OVER" if arm["over_budget"] else "")
        label = arm["label"] + (" (baseline)" if c is None else "") + (" [invalid]" if arm["invalid"] else "")
        if c is None:
            delta = nats = p = holm = paired = practice = rule = needed = ""
        else:
            delta = (f"{_f(c['delta'], signed=True)}{ci_sep}[{_f(c['ci_low'], signed=True)}, "
                     f"{_f(c['ci_high'], signed=True)}]")
            nats = _f(c["delta_nats"], signed=True)
            p, holm = _p(c["p_value"]), _p(c["holm_p"])
            paired = _p(c["paired"]["p_value"]) if c["paired"] else "-"
            practice, rule = _mark(c["verdicts"]["practice"]), _mark(c["verdicts"]["rule"])
            needed = "-" if c["seeds_needed"] is None else str(c["seeds_needed"])
        rows.append([label, _seeds(arm), mean, delta, nats, p, holm, paired, practice, rule, needed, bytes_text,
                     _f(arm["train_seconds"], 1), _f(arm["eval_seconds"], 1)])
    return rows


def effect_rows(statistics: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    effects = statistics.get("effects")
    if not effects:
        return None
    if effects["kind"] == "factorial":
        if not effects.get("available"):
            return None
        blocking = ", blocked by seed" if effects["blocked_by_seed"] else ""
        header = [f"effect (factorial{blocking})", "Δ bpb", "95% CI", "p (two-sided)"]
        rows = [[f"{kind}: {e['name']}", _f(e["estimate"], signed=True),
                 f"[{_f(e['ci_low'], signed=True)}, {_f(e['ci_high'], signed=True)}]", _p(e["p_value"])]
                for kind, group in (("main", "main"), ("interaction", "interactions")) for e in effects[group]]
        return header, rows
    header = ["contribution at the full stack", "Δ bpb (full - without)", "95% CI", "p (one-sided)"]
    rows = [[e["name"], _f(e["delta"], signed=True), f"[{_f(e['ci_low'], signed=True)}, {_f(e['ci_high'], signed=True)}]",
             _p(e["p_value"])] for e in effects["contributions"]]
    return header, rows


def render_table(summary: dict[str, Any]) -> list[Any]:
    """Rich renderables: the variant table, the effects table, the warnings."""
    from rich.table import Table
    from rich.text import Text

    statistics = summary["statistics"]
    title = f"ablation: {Path(summary['spec']['recipe']).stem}, {summary['design']}, baseline {summary['baseline']}"
    table = Table(title=Text(title), caption=Text(LEGEND))
    for col in COLUMNS:
        table.add_column(Text(col), justify="left" if col == "arm" else "right", no_wrap=col != "arm")
    for row in table_rows(statistics, ci_sep="\n"):
        styled = [Text(cell, style="red" if ("FAILED" in cell or cell == "no" or "OVER" in cell or "[invalid]" in cell)
                       else ("green" if cell == "yes" else "")) for cell in row]
        table.add_row(*styled)
    out: list[Any] = [table]
    effects = effect_rows(statistics)
    if effects:
        header, rows = effects
        extra = Table()
        for col in header:
            extra.add_column(Text(col), justify="left" if col == header[0] else "right")
        for row in rows:
            extra.add_row(*(Text(cell) for cell in row))
        out.append(extra)
    for warning in statistics["warnings"]:
        out.append(Text(f"warning: {warning}", style="yellow"))
    return out


def render_markdown(summary: dict[str, Any]) -> str:
    statistics = summary["statistics"]

    def md(header: Sequence[str], rows: list[list[str]]) -> list[str]:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]

    lines = md(COLUMNS, table_rows(statistics))
    effects = effect_rows(statistics)
    if effects:
        lines += [""] + md(*effects)
    lines += ["", LEGEND, ""] + [f"- warning: {w}" for w in statistics["warnings"]]
    return "\n".join(lines).rstrip() + "\n"


CSV_FIELDS = ("arm", "techniques_on", "baseline", "n", "launched", "failed", "mean_val_bpb", "std_val_bpb", "delta_bpb",
              "ci_low", "ci_high", "delta_nats", "t", "df", "p_value", "holm_p", "p_value_margin", "holm_p_margin",
              "practice", "rule", "paired_p_value", "seeds_needed", "bytes_max", "over_budget", "train_seconds",
              "eval_seconds", "steps")


def render_csv(summary: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for arm in summary["statistics"]["arms"]:
        c = arm.get("comparison") or {}
        writer.writerow({
            "arm": arm["id"], "techniques_on": " ".join(arm["on"]), "baseline": not c, "n": arm["n"],
            "launched": len(arm["launched"]), "failed": len(arm["failed"]), "mean_val_bpb": arm["mean"],
            "std_val_bpb": arm["std"], "delta_bpb": c.get("delta"), "ci_low": c.get("ci_low"),
            "ci_high": c.get("ci_high"), "delta_nats": c.get("delta_nats"), "t": c.get("t"), "df": c.get("df"),
            "p_value": c.get("p_value"), "holm_p": c.get("holm_p"), "p_value_margin": c.get("p_value_margin"),
            "holm_p_margin": c.get("holm_p_margin"), "practice": (c.get("verdicts") or {}).get("practice"),
            "rule": (c.get("verdicts") or {}).get("rule"), "paired_p_value": (c.get("paired") or {}).get("p_value"),
            "seeds_needed": c.get("seeds_needed"), "bytes_max": arm["bytes_max"], "over_budget": arm["over_budget"],
            "train_seconds": arm["train_seconds"], "eval_seconds": arm["eval_seconds"],
            "steps": " ".join(map(str, arm["steps"])),
        })
    return buffer.getvalue()


def render_json(summary: dict[str, Any]) -> str:
    payload = {"baseline": summary["baseline"], "design": summary["design"], "counts": summary["counts"],
               **summary["statistics"]}
    return json.dumps(payload, indent=2) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Each arm's val_bpb: seeds as dots, the mean with its 95% t-interval, the baseline mean as a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib", hint="pip install 'pgolf[plot]'") from None
    arms = summary["statistics"]["arms"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(arms) + 2), 4.0))
    for i, arm in enumerate(arms):
        values = list(arm["val_bpb"].values())
        if not values:
            continue
        ax.scatter([i] * len(values), values, s=14, color="0.6", zorder=2)
        if len(values) > 1:
            half = float(sps.t.ppf(0.975, len(values) - 1)) * arm["std"] / math.sqrt(len(values))
            ax.errorbar([i], [arm["mean"]], yerr=[[half], [half]], fmt="o", color="C0" if arm.get("comparison")
                        else "C1", capsize=4, zorder=3)
        else:
            ax.plot([i], [arm["mean"]], "o", color="C0", zorder=3)
    base = next(a for a in arms if not a.get("comparison"))
    if base["mean"] is not None:
        ax.axhline(base["mean"], color="C1", linestyle="--", linewidth=1, label="baseline mean")
        ax.legend(loc="best")
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([a["label"] for a in arms], rotation=20, ha="right")
    ax.set_ylabel("final val_bpb (lower is better)")
    ax.set_title("val_bpb per arm: seeds and 95% CI of the mean")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_summary(directory: Path) -> dict[str, Any]:
    """A stored ablation, with its statistics recomputed from the stored runs."""
    path = Path(directory) / "summary.json"
    if not path.is_file():
        raise DataError(f"no summary.json in {directory}", hint="Pass the directory pgolf ablate wrote (its --out).")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        summary["statistics"] = analyse(summary)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(f"{path} is damaged and cannot be read ({type(exc).__name__}: {exc})",
                        hint="Run the same `pgolf ablate` command again: it rebuilds summary.json from the "
                             "verified stage cache.") from None
    return summary

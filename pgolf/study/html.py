"""An ablation as one self-contained HTML page: the table, a forest plot, loss curves, bytes, audits.

`pgolf report DIR --html FILE` writes it. The figures are the terminal table's (`report.analyse`
via the loaded summary, `report.table_rows`); nothing is recomputed here. The charts are inline
SVG drawn by this module: the page needs no script, no network and no plotting library, and a
Content-Security-Policy forbids it to load anything. Every string it embeds (technique names,
paths, errors) is escaped.

Loss curves come from `metrics.jsonl` in each training's cache entry, read through the verified
cache reader; entries written before train jobs kept it have none, and the page says so per seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from pgolf.errors import ConfigError
from pgolf.study.report import BUDGET_BYTES, COLUMNS, LEGEND, effect_rows, table_rows

PALETTE = ("#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
           "#bcbd22")
CHAR_PX = 7.0  # approximate width of one character of the charts' 12 px sans-serif labels
LABEL_MAX_CHARS = 48


@dataclass
class ArmCurves:
    """One arm's training loss per logged step, per seed, and why any seed has no curve."""

    seeds: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def mean(self) -> list[tuple[int, float]]:
        """The seeds' mean at the steps every seed logged."""
        if not self.seeds:
            return []
        common = set.intersection(*({step for step, _ in points} for points in self.seeds.values()))
        by_seed = [dict(points) for points in self.seeds.values()]
        return [(step, sum(values[step] for values in by_seed) / len(by_seed)) for step in sorted(common)]


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _parse_metrics(data: bytes) -> list[tuple[int, float]]:
    points = []
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"a line is {type(record).__name__}, not a JSON object")
        step, loss = record.get("step"), record.get("train_loss")
        if isinstance(step, int) and isinstance(loss, (int, float)) and math.isfinite(loss):
            points.append((step, float(loss)))
    return points


def load_curves(directory: Path, summary: dict[str, Any], log: Callable[[str], None] | None = None
                ) -> dict[str, ArmCurves]:
    """Each arm's loss curves from its trainings' cache entries (verified reads; a damaged entry is moved aside)."""
    # These import torch (through the host and the registry): only the page needs the cache, not the table.
    from pgolf.study.cache import CorruptCacheEntry, StageCache
    from pgolf.study.jobs import METRICS_FILE

    cache = StageCache(Path(directory) / "cache", log=log)
    read: dict[str, list[tuple[int, float]] | str] = {}  # per training key: its points, or why there are none

    def points_of(key: str) -> list[tuple[int, float]] | str:
        if key not in read:
            if not cache.entry("train", key).is_dir():
                read[key] = "its training is not in the cache"
            else:
                try:
                    read[key] = _parse_metrics(cache.read_bytes("train", key, METRICS_FILE)) or \
                        "no step was logged (train.log_every is 0)"
                except FileNotFoundError:
                    read[key] = "trained by a pgolf that kept no training metrics (run the ablation again " \
                                "in a new directory to record them)"
                except CorruptCacheEntry as exc:
                    read[key] = f"its training entry is damaged ({exc.reason}); moved aside, `pgolf ablate` " \
                                "recomputes it"
                except (UnicodeDecodeError, ValueError) as exc:
                    read[key] = f"{METRICS_FILE} is unreadable ({type(exc).__name__}: {exc})"
        return read[key]

    curves = {arm["id"]: ArmCurves() for arm in summary["arms"]}
    for run in summary["runs"]:
        arm_curves = curves.get(run["arm"])
        if arm_curves is None:
            continue
        keys = run.get("keys") or {}
        if not keys.get("train"):
            why = "not run yet" if run["status"] == "pending" else "failed before training"
            arm_curves.missing.append(f"seed {run['seed']}: {why}")
            continue
        points = points_of(keys["train"])
        if isinstance(points, str):
            arm_curves.missing.append(f"seed {run['seed']}: {points}")
        else:
            arm_curves.seeds[int(run["seed"])] = points
    return curves


# --- SVG helpers ---------------------------------------------------------------------------------


def _ticks(low: float, high: float, count: int = 5) -> tuple[list[float], int]:
    """Round tick values covering [low, high], and the decimals that print them."""
    span = high - low
    raw = span / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9)
    ticks = [i * step for i in range(first, math.floor(high / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


def _padded(values: Sequence[float], fraction: float = 0.06) -> tuple[float, float]:
    low, high = min(values), max(values)
    pad = (high - low) * fraction or max(abs(high) * 0.01, 1e-6)
    return low - pad, high + pad


def _scale(low: float, high: float, start: float, end: float) -> Callable[[float], float]:
    return lambda v: start + (v - low) / (high - low) * (end - start)


def _short(label: str) -> str:
    return label if len(label) <= LABEL_MAX_CHARS else label[: LABEL_MAX_CHARS - 1] + "…"


def _label_width(labels: Sequence[str]) -> float:
    return min(max((len(_short(label)) for label in labels), default=8), LABEL_MAX_CHARS) * CHAR_PX + 16


def _text(x: float, y: float, content: str, anchor: str = "start", cls: str = "", title: str = "") -> str:
    tooltip = f"<title>{_e(title)}</title>" if title else ""
    attrs = f' class="{cls}"' if cls else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{attrs}>{tooltip}{_e(content)}</text>')


def _colours(summary: dict[str, Any]) -> dict[str, str]:
    return {arm["id"]: PALETTE[i % len(PALETTE)] for i, arm in enumerate(summary["arms"])}


# --- sections ------------------------------------------------------------------------------------


def _cell_class(cell: str) -> str:
    if "FAILED" in cell or cell == "no" or "OVER" in cell or "[invalid]" in cell:
        return ' class="bad"'
    return ' class="good"' if cell == "yes" else ""


def _table(header: Sequence[str], rows: list[list[str]], cls: str, row_ids: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{_e(col)}</th>" for col in header)
    body = []
    for i, row in enumerate(rows):
        data = f' data-arm="{_e(row_ids[i])}"' if row_ids else ""
        body.append(f"<tr{data}>" + "".join(f"<td{_cell_class(cell)}>{_e(cell)}</td>" for cell in row) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _table_section(summary: dict[str, Any]) -> str:
    statistics = summary["statistics"]
    parts = ["<h2>Arms against the baseline</h2>",
             _table(COLUMNS, table_rows(statistics), "ablation", [a["id"] for a in statistics["arms"]])]
    effects = effect_rows(statistics)
    if effects:
        parts.append(_table(effects[0], effects[1], "effects"))
    parts.append(f'<p class="legend">{_e(LEGEND)}</p>')
    if statistics["warnings"]:
        parts.append('<ul class="warnings">' + "".join(f"<li>warning: {_e(w)}</li>" for w in statistics["warnings"])
                     + "</ul>")
    return "<section>" + "".join(parts) + "</section>"


def _forest_svg(summary: dict[str, Any]) -> str:
    """Each variant's Δ bpb with its 95% interval, the baseline at zero, the rule's margin per row."""
    statistics = summary["statistics"]
    arms = [a for a in statistics["arms"] if a.get("comparison")]
    base = next(a for a in statistics["arms"] if not a.get("comparison"))
    if not arms:
        return '<p class="note">The ablation has no variant arm to compare.</p>'
    delta_text = {a["id"]: row[3] for a, row in zip(statistics["arms"], table_rows(statistics), strict=True)}
    values = [0.0]
    for a in arms:
        c = a["comparison"]
        values += [v for v in (c["delta"], c["ci_low"], c["ci_high"]) if v is not None]
        if c.get("margin_bpb"):
            values.append(-c["margin_bpb"])
    low, high = _padded(values)
    left = _label_width([a["label"] for a in arms])
    plot_w, right_w, row_h, top = 420.0, 240.0, 30.0, 34.0
    width, height = left + plot_w + right_w, top + row_h * len(arms) + 46
    x = _scale(low, high, left, left + plot_w)
    parts = [f'<svg class="forest" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="Δ bpb against the baseline, '
             f'95% intervals">']
    ticks, decimals = _ticks(low, high)
    bottom = top + row_h * len(arms)
    for t in ticks:
        parts.append(f'<line class="grid" x1="{x(t):.1f}" y1="{top - 8:.1f}" x2="{x(t):.1f}" y2="{bottom:.1f}"/>')
        parts.append(_text(x(t), bottom + 16, f"{t:+.{decimals}f}", "middle", "tick"))
    parts.append(f'<line class="zero" x1="{x(0):.1f}" y1="{top - 14:.1f}" x2="{x(0):.1f}" y2="{bottom:.1f}"/>')
    parts.append(_text(x(0), top - 18, f"baseline: {_short(base['label'])}", "middle", "axis"))
    parts.append(_text(left + plot_w / 2, bottom + 36, "Δ val_bpb against the baseline (negative: the arm is better)",
                       "middle", "axis"))
    for i, a in enumerate(arms):
        c, y = a["comparison"], top + row_h * i + row_h / 2
        parts.append(_text(left - 8, y + 4, _short(a["label"]), "end", "label", title=a["label"]))
        if c.get("margin_bpb"):
            m = x(-c["margin_bpb"])
            parts.append(f'<line class="margin" x1="{m:.1f}" y1="{y - 10:.1f}" x2="{m:.1f}" y2="{y + 10:.1f}"/>')
        if c["ci_low"] is None or c["ci_high"] is None or c["delta"] is None:
            parts.append(_text(left + plot_w + 10, y + 4, "no interval: fewer than two seeds in an arm", cls="note"))
            continue
        side = "better" if c["ci_high"] < 0 else ("worse" if c["ci_low"] > 0 else "unclear")
        x0, x1, xd = x(c["ci_low"]), x(c["ci_high"]), x(c["delta"])
        parts.append(f'<g class="interval {side}" data-arm="{_e(a["id"])}">'
                     f'<title>{_e(a["label"])}: Δ {_e(delta_text[a["id"]])}</title>'
                     f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}"/>'
                     f'<line x1="{x0:.1f}" y1="{y - 6:.1f}" x2="{x0:.1f}" y2="{y + 6:.1f}"/>'
                     f'<line x1="{x1:.1f}" y1="{y - 6:.1f}" x2="{x1:.1f}" y2="{y + 6:.1f}"/>'
                     f'<circle cx="{xd:.1f}" cy="{y:.1f}" r="4"/></g>')
        parts.append(_text(left + plot_w + 10, y + 4, delta_text[a["id"]], cls="value"))
    parts.append("</svg>")
    return "".join(parts)


def _forest_section(summary: dict[str, Any]) -> str:
    return ("<section><h2>Δ bpb with 95% intervals</h2>" + _forest_svg(summary)
            + '<p class="legend">Each variant arm\'s mean Δ val_bpb against the baseline arm (dot) and the 95% '
              "Welch interval of the difference (bar): green when the whole interval is below zero, red when "
              "above, grey when it contains zero. The dashed tick is the written rule's margin (0.005 nats per "
              "token in bpb): the rule asks for an improvement beyond it at p &lt; 0.01.</p></section>")


def _same_trainings(summary: dict[str, Any]) -> dict[str, str]:
    """Arm id -> the label of an earlier arm with exactly its trainings (its toggles act after training)."""
    first: dict[frozenset[str], str] = {}
    out = {}
    for arm in summary["arms"]:
        keys = [(r.get("keys") or {}).get("train") for r in summary["runs"] if r["arm"] == arm["id"]]
        if not keys or None in keys:
            continue
        earlier = first.setdefault(frozenset(keys), arm["label"])
        if earlier != arm["label"]:
            out[arm["id"]] = earlier
    return out


def _curves_svg(summary: dict[str, Any], curves: dict[str, ArmCurves], colours: dict[str, str]) -> str:
    drawn = [(arm, curves[arm["id"]]) for arm in summary["arms"] if curves[arm["id"]].seeds]
    points = [p for _, c in drawn for seed_points in c.seeds.values() for p in seed_points]
    if not points:
        return ""
    step_low, step_high = min(s for s, _ in points), max(s for s, _ in points)
    if step_low == step_high:
        step_low, step_high = step_low - 1, step_high + 1
    loss_low, loss_high = _padded([loss for _, loss in points])
    left, top, plot_w, plot_h = 64.0, 16.0, 640.0, 300.0
    width, height = left + plot_w + 24, top + plot_h + 48
    x, y = _scale(step_low, step_high, left, left + plot_w), _scale(loss_low, loss_high, top + plot_h, top)
    parts = [f'<svg class="curves" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="training loss per step, per arm">']
    loss_ticks, loss_decimals = _ticks(loss_low, loss_high)
    for t in loss_ticks:
        parts.append(f'<line class="grid" x1="{left:.1f}" y1="{y(t):.1f}" x2="{left + plot_w:.1f}" y2="{y(t):.1f}"/>')
        parts.append(_text(left - 6, y(t) + 4, f"{t:.{loss_decimals}f}", "end", "tick"))
    step_ticks, _ = _ticks(step_low, step_high)
    for t in step_ticks:
        if float(t).is_integer():
            parts.append(_text(x(t), top + plot_h + 16, f"{t:.0f}", "middle", "tick"))
    parts.append(f'<rect class="frame" x="{left:.1f}" y="{top:.1f}" width="{plot_w:.1f}" height="{plot_h:.1f}"/>')
    parts.append(_text(left + plot_w / 2, top + plot_h + 38, "training step", "middle", "axis"))
    parts.append(f'<text class="axis" x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">training loss</text>')
    shared = _same_trainings(summary)

    def polyline(series: list[tuple[int, float]], cls: str, arm: dict[str, Any], title: str) -> str:
        coordinates = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series)
        cls += " shared" if arm["id"] in shared else ""  # dashed: it lies on an earlier arm's curve
        return (f'<polyline class="{cls}" data-arm="{_e(arm["id"])}" stroke="{colours[arm["id"]]}" '
                f'points="{coordinates}"><title>{_e(title)}</title></polyline>')

    for arm, c in drawn:
        if len(c.seeds) > 1:
            for seed, series in sorted(c.seeds.items()):
                parts.append(polyline(series, "curve seed", arm, f"{arm['label']}, seed {seed}"))
    for arm, c in drawn:
        series = c.mean() if len(c.seeds) > 1 else next(iter(c.seeds.values()))
        if not series:  # the seeds logged no step in common
            continue
        count = f"mean of {len(c.seeds)} seeds" if len(c.seeds) > 1 else f"seed {next(iter(c.seeds))}"
        parts.append(polyline(series, "curve mean", arm, f"{arm['label']} ({count})"))
    parts.append("</svg>")
    return "".join(parts)


def _curves_section(summary: dict[str, Any], curves: dict[str, ArmCurves], colours: dict[str, str]) -> str:
    svg = _curves_svg(summary, curves, colours)
    shared = _same_trainings(summary)
    items = []
    for arm in summary["arms"]:
        c = curves[arm["id"]]
        notes = []
        if c.seeds:
            notes.append(f"{len(c.seeds)} seed(s) drawn" + (", thin lines per seed, the thick line their mean at "
                                                            "the steps all logged" if len(c.seeds) > 1 else ""))
        if arm["id"] in shared:
            notes.append(f"the same trainings as {shared[arm['id']]} (its toggles act after training): the same "
                         "curve, dashed")
        notes += [f"no curve for {m}" for m in c.missing]
        items.append(f'<li data-arm="{_e(arm["id"])}"><span class="swatch" style="background:{colours[arm["id"]]}">'
                     f'</span><b>{_e(arm["label"])}</b>: {_e("; ".join(notes) or "no curve")}</li>')
    body = svg or '<p class="note">No arm has training metrics to draw.</p>'
    return (f"<section><h2>Training loss</h2>{body}<ul class=\"curve-legend\">{''.join(items)}</ul>"
            '<p class="legend">Training loss (nats per token, on the training batches) at each logged step, '
            "from metrics.jsonl in each training's verified cache entry.</p></section>")


def _bytes_words(arm: dict[str, Any]) -> str:
    if arm["bytes_max"] is None:
        return "no finished run"
    words = f"{arm['bytes_max']:,} bytes, {arm['bytes_max'] / arm['budget_bytes']:.2%} of {arm['budget_bytes']:,}"
    return words + (f": OVER by {arm['bytes_max'] - arm['budget_bytes']:,}" if arm["over_budget"] else "")


def _budget_section(summary: dict[str, Any], colours: dict[str, str]) -> str:
    arms = summary["statistics"]["arms"]
    measured = [a for a in arms if a["bytes_max"] is not None]
    top = max([BUDGET_BYTES if not measured else 0] + [max(a["bytes_max"], a["budget_bytes"]) for a in measured])
    left = _label_width([a["label"] for a in arms])
    words = {a["id"]: _bytes_words(a) for a in arms}
    plot_w, row_h = 420.0, 26.0
    text_w = 1.15 * CHAR_PX * max(len(w) for w in words.values())  # the over-budget lines are bold
    width, height = left + plot_w + 20 + text_w, row_h * len(arms) + 12
    x = _scale(0, top, left, left + plot_w)
    parts = [f'<svg class="budget" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="artifact bytes against the budget">']
    for i, a in enumerate(arms):
        y = 6 + row_h * i
        parts.append(_text(left - 8, y + 15, _short(a["label"]), "end", "label", title=a["label"]))
        parts.append(f'<rect class="track" x="{left:.1f}" y="{y + 3:.1f}" width="{plot_w:.1f}" height="16"/>')
        limit = x(a["budget_bytes"])
        if a["bytes_max"] is None:
            parts.append(_text(left + plot_w + 10, y + 15, words[a["id"]], cls="note"))
        else:
            bar = max(x(a["bytes_max"]) - left, 1.5)
            over = " over" if a["over_budget"] else ""
            parts.append(f'<rect class="budget-bar{over}" data-arm="{_e(a["id"])}" x="{left:.1f}" y="{y + 3:.1f}" '
                         f'width="{bar:.1f}" height="16" fill="{colours[a["id"]]}"><title>{_e(a["label"])}: '
                         f'{a["bytes_max"]:,} bytes</title></rect>')
            parts.append(_text(left + plot_w + 10, y + 15, words[a["id"]],
                               cls="value bad" if a["over_budget"] else "value"))
        parts.append(f'<line class="limit" x1="{limit:.1f}" y1="{y:.1f}" x2="{limit:.1f}" y2="{y + 22:.1f}"/>')
    parts.append("</svg>")
    return ("<section><h2>Artifact bytes against the budget</h2>" + "".join(parts)
            + '<p class="legend">Each arm\'s largest artifact over its finished seeds (code plus compressed '
              "weights, as counted); the black mark is the budget.</p></section>")


def _audit_section(summary: dict[str, Any]) -> str:
    labels = {a["id"]: a["label"] for a in summary["arms"]}
    finished = [r for r in summary["runs"] if r["status"] == "ok"]
    names: list[str] = []
    for r in finished:
        names += [n for n in r["result"].get("compliance", {}) if n not in names]
    failures, rows = [], []
    for r in finished:
        audits = r["result"].get("compliance", {})
        cells = []
        for name in names:
            outcome = audits.get(name)
            if outcome is None:
                cells.append("<td>-</td>")
            elif outcome.get("passed"):
                cells.append('<td class="good">pass</td>')
            else:
                cells.append(f'<td class="bad" data-audit="{_e(name)}">FAIL</td>')
                detail = json.dumps(outcome.get("detail"), default=str)
                failures.append(f"<li>{_e(labels.get(r['arm'], r['arm']))}, seed {_e(r['seed'])}: <b>{_e(name)}</b> "
                                f"<code>{_e(detail[:400] + ('…' if len(detail) > 400 else ''))}</code></li>")
        rows.append(f'<tr data-arm="{_e(r["arm"])}" data-seed="{_e(r["seed"])}"><td>{_e(labels.get(r["arm"], r["arm"]))}'
                    f'</td><td>{_e(r["seed"])}</td>{"".join(cells)}</tr>')
    broken = [f"<li>{_e(labels.get(r['arm'], r['arm']))}, seed {_e(r['seed'])}: failed at "
              f"{_e(r.get('failed_stage') or '?')}: <code>{_e(r.get('error') or '')}</code></li>"
              for r in summary["runs"] if r["status"] == "failed"]
    pending = [f"{labels.get(r['arm'], r['arm'])} seed {r['seed']}" for r in summary["runs"] if r["status"] == "pending"]
    invalid = len({(r["arm"], r["seed"]) for r in finished if not r["result"].get("valid", True)})
    verdict = (f"{invalid} of {len(finished)} finished runs fail at least one audit: their arms are marked [invalid]."
               if invalid else f"All {len(finished)} finished runs pass every audit.")
    parts = [f"<section><h2>Validity audits</h2><p>{_e(verdict)}</p>"]
    if finished:
        head = "".join(f"<th>{_e(n)}</th>" for n in names)
        parts.append(f'<table class="audits"><thead><tr><th>arm</th><th>seed</th>{head}</tr></thead>'
                     f"<tbody>{''.join(rows)}</tbody></table>")
    if failures:
        parts.append('<h3>Failed audits</h3><ul class="audit-failures">' + "".join(failures) + "</ul>")
    if broken:
        parts.append('<h3>Runs that failed</h3><ul class="run-failures">' + "".join(broken) + "</ul>")
    if pending:
        parts.append(f'<p class="note">Not finished: {_e(", ".join(pending))}.</p>')
    return "".join(parts) + "</section>"


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1b1b1b; max-width: 1500px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 17px; margin: 28px 0 8px; } h3 { font-size: 14px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; white-space: normal; min-width: 12em; }
.bad { color: #b00020; font-weight: 600; } .good { color: #1b7a2e; font-weight: 600; }
.legend, .note { color: #555; font-size: 12.5px; max-width: 1100px; } .warnings li { color: #8a5a00; }
svg text { font: 12px system-ui, sans-serif; fill: #1b1b1b; } svg text.tick, svg text.note { fill: #666; }
svg text.value.bad { fill: #b00020; }
svg .grid { stroke: #e4e4e4; } svg .zero { stroke: #333; stroke-width: 1.5; }
svg .margin { stroke: #888; stroke-dasharray: 3 2; } svg .frame { fill: none; stroke: #bbb; }
svg .interval line { stroke-width: 2.5; } svg .interval circle { stroke: #fff; stroke-width: 1; }
svg .interval.better line { stroke: #1b7a2e; } svg .interval.better circle { fill: #1b7a2e; }
svg .interval.worse line { stroke: #b00020; } svg .interval.worse circle { fill: #b00020; }
svg .interval.unclear line { stroke: #777; } svg .interval.unclear circle { fill: #444; }
svg .curve { fill: none; stroke-linejoin: round; } svg .curve.seed { stroke-width: 1; opacity: 0.35; }
svg .curve.mean { stroke-width: 2.5; } svg .curve.shared { stroke-dasharray: 7 5; } svg .track { fill: #f2f2f2; } svg .limit { stroke: #000; stroke-width: 2; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px; vertical-align: -1px; }
.curve-legend { list-style: none; padding: 0; } code { font-size: 12px; word-break: break-all; }
"""


def render_html(summary: dict[str, Any], curves: dict[str, ArmCurves], directory: Path | str) -> str:
    """The page: facts, the table, the forest plot, the loss curves, the bytes, the audits."""
    spec = summary.get("spec", {})
    recipe = str(spec.get("recipe", "?"))
    title = f"ablation: {Path(recipe).stem}, {summary['design']}"
    seeds = sorted({r["seed"] for r in summary["runs"]})
    facts = [("directory", str(directory)), ("recipe", recipe), ("design", summary["design"]),
             ("baseline arm", next(a["label"] for a in summary["arms"] if a["id"] == summary["baseline"])),
             ("seeds", ", ".join(map(str, seeds))), ("device", summary.get("device", "?")),
             ("pgolf", summary.get("pgolf_version", "?")),
             ("written", f"{summary.get('created', '?')} to {summary.get('updated', '?')}"),
             ("command", " ".join(map(str, summary.get("command") or [])) or "?")]
    facts += [("note", n) for n in summary.get("notes") or []]
    colours = _colours(summary)
    head = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>")
    body = [f"<body><h1>{_e(title)}</h1>",
            '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>",
            _table_section(summary), _forest_section(summary), _curves_section(summary, curves, colours),
            _budget_section(summary, colours), _audit_section(summary), "</body></html>\n"]
    return head + "".join(body)


def write_html(directory: Path, summary: dict[str, Any], path: Path,
               log: Callable[[str], None] | None = None) -> None:
    """Read the loss curves from the ablation's cache and write the page to `path`."""
    page = render_html(summary, load_curves(directory, summary, log), directory)
    try:
        Path(path).write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the HTML report to {path}: {exc.strerror or exc}",
                          hint="Pass --html a file path in a folder that exists and is writable.") from None

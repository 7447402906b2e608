"""`pgolf report DIR --html FILE`: one self-contained page, checked in a real headless browser.

The page is built from a real micro ablation (a train toggle and an export toggle, factorial, 2
seeds) whose byte budget sits between the two artifact sizes, so some runs fail the byte audit.
Debian's chromium renders it (`--dump-dom`, `--screenshot`); the tests assert on the DOM the
browser produced, and on the browser reporting nothing (no console message: the page's
Content-Security-Policy makes any attempt to load something a logged violation).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.study.cache import StageCache
from pgolf.study.html import ArmCurves, load_curves, render_html
from pgolf.study.jobs import METRICS_FILE
from pgolf.study.report import analyse, table_rows
from pgolf.study.scheduler import run_ablation
from pgolf.study.spec import AblationSpec
from tests.ablation_techniques import MODULE
from tests.conftest import MICRO, REPO

BITS = f"{MODULE}:FewerBits"
BUDGET = 105_000  # micro artifacts: ~118 KB at int8, ~95 KB with FewerBits' 6-bit codes
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y "
                                    "chromium): the browser check of the HTML report is skipped")
WINDOW = (1400, 2000)


# --- the browser and its DOM -------------------------------------------------------------------------


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=120)


def browser_messages(stderr: str) -> list[str]:
    """What the page made the browser say: console messages (errors, CSP violations); not its own noise."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if child.tag == tag and (cls is None or cls in child.classes):
                found.append(child)
            found += child.all(tag, cls)
        return found

    def one(self, tag: str, cls: str | None = None) -> Node:
        found = self.all(tag, cls)
        assert len(found) == 1, (tag, cls, len(found))
        return found[0]

    def content(self) -> str:
        return self.text + "".join(c.content() for c in self.children)


class DomBuilder(HTMLParser):
    """The browser's serialized DOM as a tree (it closes every non-void element it writes)."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "track"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        node = self.stack[-1]
        if node.children:
            node.children.append(Node("#text", {}, text=data))
        else:
            node.text += data


def parse_dom(text: str) -> Node:
    builder = DomBuilder()
    builder.feed(text)
    builder.close()
    return builder.root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# --- a real micro ablation ---------------------------------------------------------------------------


def write_recipe(folder: Path) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "recipes" / "baseline.yaml"), "name": "study"}))
    return path


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("html")
    spec = AblationSpec(recipe=str(write_recipe(folder)), toggle=["leaky_relu", BITS], seeds=[1, 2], scale="tiny",
                        set=[*MICRO, f"export.budget_bytes={BUDGET}"])
    out, summary = run_ablation(spec, folder / "ablation", log=lambda _line: None)
    assert all(r["status"] == "ok" for r in summary["runs"])
    return out, summary


@pytest.mark.slow
def test_train_entries_keep_their_metrics_under_the_cache_checksums(ablation):
    out, summary = ablation
    cache = StageCache(out / "cache")
    for key in {r["keys"]["train"] for r in summary["runs"]}:
        recorded = json.loads((cache.entry("train", key) / "checksums.json").read_text())["files"]
        assert METRICS_FILE in recorded
        lines = [json.loads(line) for line in cache.read_bytes("train", key, METRICS_FILE).decode().splitlines()]
        assert [line["step"] for line in lines] == [1, 2, 3]  # MICRO: 3 steps, every step logged
        assert all(line["train_loss"] > 0 for line in lines)


@pytest.mark.slow
@needs_chromium
def test_the_browser_renders_every_part_of_the_page(ablation, tmp_path):
    out, summary = ablation
    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(out), "--format", "csv", "--html", str(page)])
    assert result.exit_code == 0, result.output
    ET.fromstring(page.read_text(encoding="utf-8").split("\n", 1)[1])  # well-formed: every element closed, escaped

    dumped = chromium(page, tmp_path / "profile", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert browser_messages(dumped.stderr) == []
    dom = parse_dom(dumped.stdout)
    statistics = summary["statistics"]
    arms = [a["id"] for a in statistics["arms"]]
    variants = [a["id"] for a in statistics["arms"] if a.get("comparison")]

    rows = dom.one("table", "ablation").one("tbody").all("tr")  # the terminal table's figures, cell for cell
    assert [r.attrs["data-arm"] for r in rows] == arms
    assert [[td.content() for td in r.all("td")] for r in rows] == table_rows(statistics)

    intervals = dom.one("svg", "forest").all("g", "interval")
    assert [g.attrs["data-arm"] for g in intervals] == variants
    assert all(len(g.all("line")) == 3 and len(g.all("circle")) == 1 for g in intervals)

    curves = dom.one("svg", "curves")
    assert [p.attrs["data-arm"] for p in curves.all("polyline", "mean")] == arms
    assert len(curves.all("polyline", "seed")) == 2 * len(arms)  # every arm ran 2 seeds
    assert all(len(p.attrs["points"].split()) == 3 for p in curves.all("polyline"))
    # fewer_bits re-exports the baseline's checkpoints: its curve is the baseline's, drawn dashed
    shared = {p.attrs["data-arm"] for p in curves.all("polyline", "shared")}
    assert shared == {BITS, f"leaky_relu+{BITS}"}

    bars = dom.one("svg", "budget").all("rect", "budget-bar")
    assert [b.attrs["data-arm"] for b in bars] == arms
    over = {a["id"] for a in statistics["arms"] if a["over_budget"]}
    assert {b.attrs["data-arm"] for b in bars if "over" in b.classes} == over == {"none", "leaky_relu"}
    widths = {b.attrs["data-arm"]: float(b.attrs["width"]) for b in bars}
    assert widths["none"] > widths[BITS]

    audit_rows = dom.one("table", "audits").one("tbody").all("tr")
    failing = {(r.attrs["data-arm"], int(r.attrs["data-seed"])) for r in audit_rows
               if any(td.attrs.get("data-audit") == "byte_budget" for td in r.all("td"))}
    assert failing == {(r["arm"], r["seed"]) for r in summary["runs"] if "byte_budget" in r["result"]["failed_audits"]}
    assert len(failing) == 4 and len(audit_rows) == 8

    shot = tmp_path / "report.png"
    drawn = chromium(page, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert drawn.returncode == 0 and browser_messages(drawn.stderr) == [], drawn.stderr[-2000:]
    assert png_size(shot) == WINDOW

    # the check above has teeth: the same page reaching for the network is reported by the browser
    reaching = tmp_path / "reaching.html"
    reaching.write_text(page.read_text(encoding="utf-8").replace("<h1>", '<img src="http://192.0.2.1/x.png"/><h1>', 1))
    assert any("Content Security Policy" in line
               for line in browser_messages(chromium(reaching, tmp_path / "profile", "--dump-dom").stderr))


# --- without training: escaping, missing curves, errors ----------------------------------------------

HOSTILE = '<script>alert("x")</script> & \'q\''


def stored_run(arm: str, seed: int, bpb: float, key: str, *, failed_audit: str | None = None) -> dict:
    compliance = {"byte_budget": {"passed": failed_audit != "byte_budget", "detail": {"note": HOSTILE}},
                  "causality": {"passed": True, "detail": {}}}
    result = {"val_bpb": bpb, "tokens_per_byte": 0.41, "bytes_total": 15_000_000, "steps": 500, "train_seconds": 600.0,
              "eval_seconds": 80.0, "valid": failed_audit is None, "failed_audits": [failed_audit] if failed_audit else [],
              "val_bytes": 1000, "val_partial": False, "export": {"budget_bytes": 16_000_000},
              "data": {"tokenizer_sha256": "t", "val_bytes_total": 1000}, "compliance": compliance}
    return {"arm": arm, "toggles_on": [] if arm == "none" else [arm], "seed": seed, "status": "ok",
            "keys": {"train": key, "export": key + "e", "eval": key + "v"}, "result": result}


def hostile_summary() -> dict:
    """Two arms; the variant's name, the recipe path and an audit detail carry markup."""
    runs = [stored_run("none", 1, 1.2244, "a1"), stored_run("none", 2, 1.2251, "a2"),
            stored_run("evil", 1, 1.2231, "b1", failed_audit="byte_budget"), stored_run("evil", 2, 1.2236, "b2")]
    summary = {"spec": {"recipe": f"recipes/{HOSTILE}.yaml"}, "toggles": ["evil"], "design": "factorial",
               "technique_names": {"evil": HOSTILE}, "baseline": "none",
               "arms": [{"id": "none", "label": "(none)", "on": []}, {"id": "evil", "label": HOSTILE, "on": ["evil"]}],
               "counts": {s: {"ran": 0, "reused": 0} for s in ("train", "export", "eval")}, "runs": runs,
               "command": ["pgolf", "ablate", HOSTILE], "notes": [HOSTILE]}
    summary["statistics"] = analyse(summary)
    return summary


def test_every_embedded_string_is_escaped():
    curves = {"none": ArmCurves({1: [(1, 6.9), (2, 6.8)], 2: [(1, 6.95), (2, 6.85)]}),
              "evil": ArmCurves({1: [(1, 6.9), (2, 6.7)]}, [f"seed 2: {HOSTILE}"])}
    page = render_html(hostile_summary(), curves, Path(f"/runs/{HOSTILE}"))
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    root = ET.fromstring(page.split("\n", 1)[1])  # well-formed XML too: nothing unescaped breaks the structure
    texts = [t for e in root.iter() for t in (e.text, e.tail) if t]
    assert sum(HOSTILE in t for t in texts) >= 8  # facts, table, forest, curves, bytes, audits: as plain text
    labels = [e.get("data-arm") for e in root.iter() if e.get("data-arm")]
    assert set(labels) == {"none", "evil"}


def test_the_mean_curve_uses_the_steps_every_seed_logged():
    curves = ArmCurves({1: [(1, 6.0), (2, 5.0), (3, 4.0)], 2: [(1, 7.0), (2, 6.0)]})
    assert curves.mean() == [(1, 6.5), (2, 5.5)]


def make_entry(cache: StageCache, key: str, metrics: bytes | None) -> None:
    with cache.writing("train", key) as tmp:
        (tmp / "train.json").write_text("{}")
        if metrics is not None:
            (tmp / METRICS_FILE).write_bytes(metrics)


def test_each_seed_without_a_curve_says_why(tmp_path):
    summary = hostile_summary()
    cache = StageCache(tmp_path / "cache", log=lambda _line: None)
    make_entry(cache, "a1", b'{"step": 1, "train_loss": 6.9}\n{"step": 2, "train_loss": 6.8}\n')
    make_entry(cache, "a2", None)  # an entry from before train jobs kept their metrics
    make_entry(cache, "b1", b"")  # train.log_every=0: nothing was logged
    make_entry(cache, "b2", b'{"step": 1, "train_loss": 6.9}\n')
    (cache.entry("train", "b2") / METRICS_FILE).write_bytes(b'{"step": 1, "train_loss": 1.0}\n')  # edited after

    logged: list[str] = []
    curves = load_curves(tmp_path, summary, log=logged.append)
    assert curves["none"].seeds == {1: [(1, 6.9), (2, 6.8)]}
    assert curves["none"].missing == ["seed 2: trained by a pgolf that kept no training metrics (run the ablation "
                                      "again in a new directory to record them)"]
    assert curves["evil"].seeds == {}
    assert curves["evil"].missing[0] == "seed 1: no step was logged (train.log_every is 0)"
    assert "seed 2: its training entry is damaged" in curves["evil"].missing[1]
    assert not cache.entry("train", "b2").exists() and "b2 is damaged" in logged[0]  # moved aside, reported

    page = render_html(summary, curves, tmp_path)
    assert "kept no training metrics" in page and "no step was logged" in page
    assert page.count('class="curve mean') == 1


def test_the_cli_writes_the_page_and_names_a_path_it_cannot_write(tmp_path):
    summary = hostile_summary()
    summary.pop("statistics")
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = tmp_path / "page.html"
    ok = CliRunner().invoke(app, ["report", str(tmp_path), "--format", "md", "--html", str(page)])
    assert ok.exit_code == 0, ok.output
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert "its training is not in the cache" in page.read_text(encoding="utf-8")

    bad = CliRunner().invoke(app, ["report", str(tmp_path), "--html", str(tmp_path / "missing" / "page.html")])
    assert bad.exit_code == 2
    assert "cannot write the HTML report" in bad.output and "Traceback" not in bad.output

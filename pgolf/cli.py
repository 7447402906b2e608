"""The `pgolf` command line (Typer).

User errors (`PgolfError`) print one paragraph and exit 2 without a traceback; `--debug`
shows the traceback. `python -m pgolf` is the same program.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pgolf.errors import PgolfError
from pgolf.reporter import Reporter

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pgolf: run, ablate and judge Parameter Golf techniques on one shared lifecycle.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare data: the challenge's FineWeb shards or your own text.")
app.add_typer(data_app, name="data")
records_app = typer.Typer(no_args_is_help=True, help="Challenge records folders stored as arms for `pgolf stats` "
                          "(record:NAME).")
app.add_typer(records_app, name="records")
console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

EXIT_USER_ERROR = 2


def guarded(debug: bool, fn: Callable[[], T]) -> T:
    """Run a command body; user errors become one clear paragraph and exit code 2."""
    try:
        return fn()
    except PgolfError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(exc.render())}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


class RichReporter(Reporter):
    """Progress bar while training, plain log lines otherwise (and always into log.txt)."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(quiet=not enabled)
        self.enabled = enabled
        self.progress_bar: Progress | None = None
        self.task: Any = None

    def log(self, message: str) -> None:
        self.write(message)
        if self.enabled:
            target = self.progress_bar.console if self.progress_bar is not None else console
            target.print(message, highlight=False, soft_wrap=True)

    def stage(self, name: str) -> None:
        self.write(f"== {name}")
        if self.enabled:
            console.print(f"[bold cyan]== {name}[/]")

    def progress(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.progress_bar is None:
            self.progress_bar = Progress(
                TextColumn("[bold]train[/]"), BarColumn(), TextColumn("step {task.fields[step]}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeRemainingColumn(), console=console, transient=True)
            self.progress_bar.start()
            total = info["cap"] if info["cap"] else info["iterations"]
            self.task = self.progress_bar.add_task("train", total=total, step=0, loss="-", tps="-")
        done = info["elapsed"] if info["cap"] else info["step"]
        loss = info["loss"]
        self.progress_bar.update(self.task, completed=done, step=info["step"],
                                 loss=f"{loss:.4f}" if loss == loss else "-", tps=f"{info['tokens_per_s']:,.0f}")

    def done(self) -> None:
        if self.progress_bar is not None:
            self.progress_bar.stop()
            self.progress_bar = None


def default_out_dir(name: str, scale: str | None, seed: int) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}{'-' + scale if scale else ''}-seed{seed}-{stamp}"


def summary_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['recipe']} (seed {result['seed']})", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("val_bpb", f"{result['val_bpb']:.6f}" + (" (partial val)" if result.get("val_partial") else ""))
    table.add_row("val_bpb pre-quant", f"{result['val_bpb_prequant']:.6f}")
    table.add_row("val_loss", f"{result['val_loss']:.6f}")
    budget = result.get("export", {}).get("budget", 16_000_000)
    total = result["bytes_total"]
    table.add_row("artifact bytes", f"{total:,} = model {result['bytes_model']:,} + code {result['bytes_code']:,}"
                  + ("  [red]OVER BUDGET[/]" if total > budget else ""))
    table.add_row("train", f"{result['steps']} steps, {result['train_seconds']:.1f}s")
    table.add_row("eval", f"{result['eval_seconds']:.1f}s")
    marks = "  ".join(f"{name} {'[green]ok[/]' if a['passed'] else '[red]FAIL[/]'}"
                      for name, a in result["compliance"].items())
    table.add_row("audits", marks)
    table.add_row("valid", "[green]yes[/]" if result["valid"] else f"[red]no[/] ({', '.join(result['failed_audits'])})")
    return table


# Options several commands share: one definition each, so their flags and help agree.
SCALE_OPTION = typer.Option(None, help="Scale overlay, e.g. 'tiny' for a CPU run on the embedded corpus.")
TOKENIZER_OPTION = typer.Option(None, help="SentencePiece .model for --data.")
STEPS_OPTION = typer.Option(None, help="Step-matched mode: exactly N steps, no wallclock cap.")
SET_OPTION = typer.Option([], "--set", help="Override a recipe value: key.path=value (repeatable).")
DEBUG_OPTION = typer.Option(False, help="Show tracebacks.")
TRACK_OPTION = typer.Option([], "--track", help="Also log each run to mlflow, tensorboard or wandb (offline), "
                            "repeatable or comma-separated; each needs its package (pip install \"pgolf[track]\").")
TRACK_DIR_OPTION = typer.Option(None, "--track-dir", help="Where the trackers write (default: tracking/ in the run "
                                "or ablation directory); share one across commands to compare their runs.")


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/best.yaml."),
    scale: str | None = SCALE_OPTION,
    data: Path | None = typer.Option(None, help="Directory of challenge shards (fineweb_train_*.bin, fineweb_val_*.bin)."),
    tokenizer: Path | None = TOKENIZER_OPTION,
    seed: int | None = typer.Option(None, help="Random seed (default: the recipe's)."),
    steps: int | None = STEPS_OPTION,
    set_: list[str] = SET_OPTION,
    out: Path | None = typer.Option(None, help="Run directory (default: runs/<recipe>-<scale>-seed<seed>-<time>)."),
    device: str | None = typer.Option(None, help="Force a device (cpu, cuda, cuda:1)."),
    strict: bool = typer.Option(False, help="Exit non-zero when any validity audit fails."),
    track: list[str] = TRACK_OPTION,
    track_dir: Path | None = TRACK_DIR_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Run the whole lifecycle: data, train, average, export, round trip, eval, report."""

    def body() -> dict[str, Any]:
        from pgolf.host import run as run_recipe
        from pgolf.recipe import flag_overrides, load_recipe
        from pgolf.registry import technique_problems
        from pgolf.runtime import init_distributed
        from pgolf.tracking import TRACKING_DIR, Tracking, check_installed, parse_names, run_info

        trackers = parse_names(track)
        check_installed(trackers)
        r = load_recipe(recipe, flag_overrides(data, tokenizer, seed, steps, set_), scale=scale,
                        technique_check=technique_problems)
        out_dir = out or default_out_dir(r.name, r.scale, r.seed)
        main_rank = init_distributed().is_main
        reporter = RichReporter(enabled=main_rank)
        if main_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]pgolf run[/] {recipe} -> {out_dir}")
        if not (trackers and main_rank):
            result = run_recipe(r, out_dir, reporter=reporter, device=device)
        else:  # live: each metrics line as training logs it, then the result once result.json is written
            tracking = Tracking.open(trackers, track_dir or out_dir / TRACKING_DIR, log=reporter.log)
            with tracking.run(run_info(r.to_dict(), "run", out_dir.name)):
                result = run_recipe(r, out_dir, reporter=reporter, device=device, tracking=tracking)
                tracking.log_result(result)
        if main_rank:
            console.print(summary_table(result))
            console.print(f"results in {out_dir}/result.json")
        return result

    result = guarded(debug, body)
    if strict and not result["valid"]:
        err_console.print(f"[red]invalid run[/]: failed audits {', '.join(result['failed_audits'])}")
        raise typer.Exit(1)


@app.command("eval")
def eval_cmd(
    target: Path = typer.Argument(..., help="A run directory, an artifact.pga, or a final_model.pt (pgolf's or the challenge's)."),
    data: Path | None = typer.Option(None, help="Directory of challenge shards (default: the artifact's data)."),
    tokenizer: Path | None = TOKENIZER_OPTION,
    with_: str = typer.Option("", "--with", help="Eval-stage techniques to add, comma-separated (e.g. sliding_window,ttt)."),
    recipe: Path | None = typer.Option(None, help="Recipe for a final_model.pt (default: recipes/baseline.yaml)."),
    scale: str | None = typer.Option(None, help="Scale overlay for --recipe."),
    set_: list[str] = SET_OPTION,
    out: Path | None = typer.Option(None, help="Write result.json here."),
    strict: bool = typer.Option(False, help="Exit non-zero when any validity audit fails."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Re-score a stored artifact (or a raw checkpoint) without retraining."""

    def body() -> dict[str, Any]:
        from pgolf.host import evaluate_target

        extra = [w.strip() for w in with_.split(",") if w.strip()]
        result = evaluate_target(target, data=data, tokenizer=tokenizer, with_techniques=extra, recipe=recipe,
                                 scale=scale, overrides=list(set_), out_dir=out, log=console.print)
        console.print(summary_table(result))
        return result

    result = guarded(debug, body)
    if strict and not result["valid"]:
        raise typer.Exit(1)


@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Print JSON."),
            debug: bool = DEBUG_OPTION) -> None:
    """List installed techniques: summary, stage and hooks."""

    def body() -> None:
        from pgolf.registry import describe, known_names, load_technique_class

        rows = [describe(load_technique_class(name)) | {"key": name} for name in known_names()]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title="pgolf techniques")
        for col in ("name", "stage", "summary", "hooks"):
            table.add_column(col)
        for row in rows:
            hooks = ", ".join(h.removeprefix("pgolf_") for h in row["hooks"])
            table.add_row(row["key"], row["stage"], row["summary"], hooks)
        console.print(table)

    guarded(debug, body)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PgolfError(f"{flag} expects comma-separated integers, got '{text}'",
                         hint=f"For example: {flag} 42,314,999") from None


def render_ablation(summary: dict[str, Any], fmt: str, plot: Path | None) -> None:
    """Print an ablation's table in the chosen format (stdout) and draw its plot."""
    from pgolf.study import report

    if fmt not in report.FORMATS:
        raise PgolfError(f"unknown --format '{fmt}'", hint=f"Choose one of: {', '.join(report.FORMATS)}.")
    if fmt == "table":
        # Piped output gets room for the whole table; a terminal keeps its own width.
        target = console if console.is_terminal else Console(width=max(console.width, 190))
        for renderable in report.render_table(summary):
            target.print(renderable)
    else:
        text = {"md": report.render_markdown, "csv": report.render_csv, "json": report.render_json}[fmt](summary)
        sys.stdout.write(text)
    if plot is not None:
        report.plot(summary, plot)
        err_console.print(f"plot written to {plot}", markup=False, highlight=False)


@app.command()
def ablate(
    target: Path = typer.Argument(..., help="A recipe YAML, or an ablation spec (ablations/NAME.yaml) with the same fields."),
    toggle: str | None = typer.Option(None, help="Techniques to toggle on and off, comma-separated (e.g. ema,sliding_window)."),
    seeds: str | None = typer.Option(None, help="Seeds, comma-separated (default 42,314,999). Every seed counts."),
    design: str | None = typer.Option(None, help="factorial (default) | one-at-a-time | leave-one-out."),
    baseline: str | None = typer.Option(None, help="The arm variants are tested against: all-off (default) | recipe."),
    workers: int | None = typer.Option(None, help="Worker processes: one run per GPU, or CPU threads divided (default 1). "
                                       "With --executor ray: at most this many jobs at a time."),
    executor: str | None = typer.Option(None, help="local (default: worker processes here) | ray (tasks on a running "
                                        "Ray cluster; --out on storage every node shares; needs pgolf[ray])."),
    address: str | None = typer.Option(None, help="The Ray cluster's head node, HOST:PORT (default: RAY_ADDRESS, "
                                       "else the cluster started on this machine)."),
    out: Path | None = typer.Option(None, help="Ablation directory (default: runs/ablate-<recipe>-<scale>-<toggles>)."),
    scale: str | None = SCALE_OPTION,
    data: Path | None = typer.Option(None, help="Directory of challenge shards."),
    tokenizer: Path | None = TOKENIZER_OPTION,
    steps: int | None = STEPS_OPTION,
    set_: list[str] = SET_OPTION,
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run again the stages that failed before."),
    plan: bool = typer.Option(False, "--plan", help="List the stage jobs to run and the outputs already cached, "
                              "with projected device time and cost; run nothing."),
    gpu_hour_usd: float | None = typer.Option(None, help="Price of one GPU-hour in USD: turns projected time into money."),
    gpus_per_job: int | None = typer.Option(None, help="GPUs each stage job holds (default 1: pgolf ablate runs each "
                                            "job on one GPU)."),
    max_usd: float | None = typer.Option(None, help="Refuse to start (exit 2) a study projected to cost more than "
                                         "this, or whose cost cannot be projected; needs --gpu-hour-usd."),
    stop_when_decided: bool | None = typer.Option(None, "--stop-when-decided/--all-seeds", help="Skip the seeds "
                                                  "left once no outcome of them could change any arm's verdict."),
    fmt: str = typer.Option("table", "--format", help="table | md | csv | json (--plan: json, or text otherwise)."),
    plot: Path | None = typer.Option(None, help="Also draw each arm's val_bpb with its CI to this PNG (needs matplotlib)."),
    track: list[str] = TRACK_OPTION,
    track_dir: Path | None = TRACK_DIR_OPTION,
    debug: bool = DEBUG_OPTION,
) -> None:
    """Toggle techniques across seeds; train once per distinct model; Welch tests against the baseline arm."""

    def body() -> dict[str, Any] | None:
        from pgolf.study.budget import check_budget, render_projection
        from pgolf.study.scheduler import cluster_for, project_ablation, run_ablation
        from pgolf.study.spec import is_spec_file, load_spec, spec_from_flags, split_list
        from pgolf.tracking import check_installed, parse_names

        trackers = parse_names(track)
        if not plan:
            check_installed(trackers)

        flags = {"toggle": split_list(toggle), "seeds": _ints(seeds, "--seeds") if seeds else None,
                 "design": design, "baseline": baseline, "workers": workers, "out": str(out) if out else None,
                 "scale": scale, "data": str(data) if data else None,
                 "tokenizer": str(tokenizer) if tokenizer else None, "steps": steps, "set": list(set_) or None,
                 "gpu_hour_usd": gpu_hour_usd, "gpus_per_job": gpus_per_job, "max_usd": max_usd,
                 "stop_when_decided": stop_when_decided, "executor": executor, "address": address}
        spec = load_spec(target, flags) if is_spec_file(target) else spec_from_flags(target, flags)
        log = lambda message: err_console.print(message, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
        if plan:
            with cluster_for(spec, log) as cluster:  # a Ray cluster's device enters the stage keys
                directory, planned, projection = project_ablation(
                    spec, retry_failed=retry_failed, log=log, device_kind=cluster.device_kind if cluster else None)
            if fmt == "json":
                sys.stdout.write(json.dumps({"out": str(directory), **projection.to_dict()}, indent=2) + "\n")
            else:
                sys.stdout.write(render_projection(projection, planned, directory))
            check_budget(projection, spec.max_usd)
            return None
        directory, summary = run_ablation(spec, retry_failed=retry_failed, log=log, track=trackers, track_dir=track_dir)
        render_ablation(summary, fmt, plot)
        err_console.print(f"summary: {directory}/summary.json", markup=False, highlight=False)
        return summary

    summary = guarded(debug, body)
    if summary is not None and any(run["status"] not in ("ok", "skipped") for run in summary["runs"]):
        raise typer.Exit(1)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="An ablation directory written by pgolf ablate."),
    fmt: str = typer.Option("table", "--format", help="table | md | csv | json."),
    plot: Path | None = typer.Option(None, help="Also draw each arm's val_bpb with its CI to this PNG (needs matplotlib)."),
    html: Path | None = typer.Option(None, "--html", help="Also write one self-contained HTML page: the table, a forest "
                                     "plot of Δ bpb, loss curves, bytes against the budget, the audits."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Re-render an ablation's table from its stored results (runs nothing)."""

    def body() -> None:
        from pgolf.study.report import load_summary

        summary = load_summary(directory)
        render_ablation(summary, fmt, plot)
        if html is not None:
            from pgolf.study.html import write_html

            write_html(directory, summary, html,
                       log=lambda message: err_console.print(message, markup=False, highlight=False))
            err_console.print(f"html written to {html}", markup=False, highlight=False)

    guarded(debug, body)


@app.command("export")
def export_cmd(
    source: Path = typer.Argument(..., help="A run directory (pgolf run --out) or an ablation directory (pgolf ablate)."),
    out: Path = typer.Option(..., help="The records folder to write, e.g. records/track_10min_16mb/2026-05-01_name."),
    arm: str | None = typer.Option(None, help="The ablation's arm to export (its label, e.g. 'ema + ttt', or id)."),
    base_pr: int | None = typer.Option(None, help="The pull request this submission builds on."),
    keep_wallclock: bool = typer.Option(False, "--keep-wallclock", help="Keep the recipe's wallclock cap in "
                                        "train_gpt.py instead of fixing each seed's step count (step-matched)."),
    author: str | None = typer.Option(None, help="submission.json `author`."),
    github_id: str | None = typer.Option(None, help="submission.json `github_id`."),
    name: str | None = typer.Option(None, help="submission.json `name` (default: the recipe and its techniques)."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Write a challenge records folder: README.md, submission.json, train logs, requirements.txt and one
    self-contained train_gpt.py (whose size is the code bytes)."""

    def body() -> None:
        from pgolf.submission_export import CODE_FILE, export_submission

        done = export_submission(source, out, arm=arm, base_pr=base_pr, keep_wallclock=keep_wallclock,
                                 author=author, github_id=github_id, name=name,
                                 log=lambda line: err_console.print(line, markup=False, highlight=False))
        sub = done.submission
        console.print(f"wrote {escape(str(done.out))}: {CODE_FILE} {done.bundle.size:,} bytes, "
                      f"{len(sub['seeds'])} seed(s), val_bpb {sub['val_bpb']:.8f}, max total {sub['bytes_total']:,} bytes",
                      highlight=False)

    guarded(debug, body)


@app.command("stats")
def stats_cmd(
    new: list[str] = typer.Option(..., help="The new arm: per-seed val_bpb scores, comma-separated (seed:score to "
                                  "name seeds), or a submission.json or records folder (PATH@KEY reads a block such as "
                                  "compliance_rerun), or record:NAME stored by `pgolf records import`. Repeat it, or "
                                  "comma-list paths, to pool sources into one arm."),
    old: list[str] | None = typer.Option(None, help="The arm it must beat (the previous frontier row), in the same "
                                         "forms; not used by --method one-sample."),
    method: str = typer.Option("welch", help="welch: per-seed Welch (ddof=1); summary: Welch from each arm's "
                               "mean/std/n, as the May-2 rows were computed; paired: seed-matched; one-sample: "
                               "against --threshold."),
    threshold: float | None = typer.Option(None, help="--method one-sample: the fixed score the new seeds are tested "
                                           "against."),
    two_sided: bool = typer.Option(False, "--two-sided", help="alternative='two-sided' instead of 'less' (as some "
                                   "submissions printed); it passes only when the new arm is the lower one."),
    margin_nats: float = typer.Option(0.005, help="The written rule's margin in nats per token."),
    tokens_per_byte: float | None = typer.Option(None, help="Tokens per byte of the runs (val_bpb * ln 2 / val_loss), "
                                                 "to convert the margin to bpb; default: from the submissions' val_bpb "
                                                 "and val_loss. Without either the written rule is not tested."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Judge a submission against the record it must beat, by the test the leaderboard ran and the written rule."""

    def body() -> None:
        from pgolf.study.judge import judge
        from pgolf.study.submissions import read_arm

        if tokens_per_byte is not None and tokens_per_byte <= 0:
            raise PgolfError("--tokens-per-byte must be positive", hint="It is val_bpb * ln 2 / val_loss of a run.")
        judgement = judge(read_arm(new, "--new"), read_arm(old or [], "--old"), method=method,
                                alternative="two-sided" if two_sided else "less", threshold=threshold,
                                tokens_per_byte=tokens_per_byte, margin_nats=margin_nats)
        if as_json:
            print(json.dumps(judgement.to_dict(), indent=2))
        else:
            print("\n".join(judgement.text()))

    guarded(debug, body)


RECORDS_STORE_OPTION = typer.Option(None, "--store", help="The records store (default: $PGOLF_RECORDS_DIR, else "
                                    "~/.cache/pgolf/records under PGOLF_CACHE_DIR).")


@records_app.command("import")
def records_import(
    directory: Path = typer.Argument(..., help="A records folder: submission.json, train logs, README.md "
                                     "(records/track_10min_16mb/<date>_<name>/)."),
    name: str | None = typer.Option(None, help="The arm's name, for record:NAME (default: the folder's name)."),
    store: Path | None = RECORDS_STORE_OPTION,
    pr: int | None = typer.Option(None, help="The pull request the folder came from, kept in the provenance."),
    replace: bool = typer.Option(False, "--replace", help="Overwrite a stored arm of that name imported from "
                                 "other files."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored arm as JSON."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Read a records folder (submission.json and every train log), cross-check them, store it as an arm."""

    def body() -> None:
        from pgolf.study.records import import_records, summary_lines

        path, payload = import_records(directory, name=name, store=store, pr=pr, replace=replace)
        if as_json:
            print(json.dumps(payload, indent=2))
        else:
            print("\n".join(summary_lines(path, payload)))

    guarded(debug, body)


@records_app.command("list")
def records_list(
    store: Path | None = RECORDS_STORE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """The arms stored by `pgolf records import`, each verified against its own checksum."""

    def body() -> None:
        from pgolf.study.records import list_rows

        folder, rows = list_rows(store)
        if as_json:
            print(json.dumps({"store": str(folder), "arms": rows}, indent=2))
            return
        if not rows:
            print(f"no stored arms in {folder} (add one with `pgolf records import DIR`)")
            return
        table = Table(title=f"stored arms in {folder}")
        for column in ("record", "seeds", "mean val_bpb", "from", "blocks", "warnings", "pr", "date", "folder"):
            table.add_column(column)
        for row in rows:
            if row["status"] != "ok":
                table.add_row(escape(f"record:{row['name']}"), "", "", f"[red]damaged[/]: {escape(row['error'])}")
                continue
            mean = f"{row['mean_val_bpb']:.8f}" if row["mean_val_bpb"] is not None else "-"
            table.add_row(escape(f"record:{row['name']}"), str(row["n"]), mean, escape(str(row["from"])),
                          escape(", ".join(row["blocks"])), str(row["warnings"]),
                          "" if row["pr"] is None else f"#{row['pr']}", row["date"] or "", escape(row["folder"]))
        (console if console.is_terminal else Console(width=max(console.width, 200))).print(table)

    guarded(debug, body)


@app.command()
def doctor(
    data: Path | None = typer.Option(None, help="Also check this shard directory: counts, headers, val tokens, tokenizer."),
    tokenizer: Path | None = TOKENIZER_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Check this machine (and --data) before spending money on it; exit 1 when a check fails."""

    def body() -> int:
        import os

        from pgolf.doctor import DoctorInputs, exit_code, render_table, report_json, run_checks, summary_line

        findings = run_checks(DoctorInputs(data=data, tokenizer=tokenizer, environ=dict(os.environ)), reraise=debug)
        if as_json:
            print(json.dumps(report_json(findings), indent=2))
        else:
            # Piped output gets room for the fix column; a terminal keeps its own width.
            (console if console.is_terminal else Console(width=max(console.width, 160))).print(render_table(findings))
            console.print(summary_line(findings), highlight=False)
        return exit_code(findings)

    code = guarded(debug, body)
    if code:
        raise typer.Exit(code)


@data_app.command("text")
def data_text(
    inputs: list[Path] = typer.Argument(..., help="Plain-text files, or JSONL files with a 'text' field per line."),
    vocab: int = typer.Option(1024, help="Tokenizer vocabulary size."),
    out: Path = typer.Option(..., help="Output directory for the tokenizer and shards."),
    val_docs: int | None = typer.Option(None, help="Number of validation documents (default: 10% of documents, at least 1)."),
    doc_mode: str = typer.Option("file", help="How plain-text files split into documents: 'file' (one per file) or 'paragraph'."),
    transform: str | None = typer.Option(None, help="Apply a technique's text transform (e.g. casefold) before tokenizing."),
    casefold: bool = typer.Option(False, "--casefold", help="Same as --transform casefold: lossless CaseOps with a byte sidecar."),
    tokenizer: Path | None = typer.Option(None, help="Use this SentencePiece model instead of training one."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Turn local text or JSONL into a tokenizer (the challenge's trainer settings) and train/val shards."""

    def body() -> None:
        from pgolf.data.textdata import build_dataset, read_documents, split_train_val
        from pgolf.errors import ConfigError
        from pgolf.registry import transform_by_name

        nonlocal transform
        if casefold:
            if transform not in (None, "casefold"):
                raise ConfigError(f"--casefold and --transform {transform} ask for two transforms", hint="Pass one of them.")
            transform = "casefold"
        docs = read_documents(inputs, doc_mode)
        train_docs, val = split_train_val(docs, val_docs)
        built = build_dataset(out, train_docs, val, vocab, transform=transform_by_name(transform), tokenizer=tokenizer)
        console.print_json(json.dumps(built.manifest))

    guarded(debug, body)


@data_app.command("fineweb")
def data_fineweb(
    variant: str = typer.Option("sp1024", help="Tokenizer family of the export: sp1024 or sp8192."),
    train_shards: int = typer.Option(80, help="Training shards to fetch (100M tokens each; the first N of the frozen order)."),
    out: Path | None = typer.Option(None, help="Output directory (default: data/fineweb10B_<variant>)."),
    repo_id: str = typer.Option("willdepueoai/parameter-golf", help="Hugging Face dataset repository of the export."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit of --repo-id."),
    local_repo: Path | None = typer.Option(None, help="Copy from a local directory laid out like the repository instead."),
    remote_root: str = typer.Option("datasets", help="Folder of the repository that holds manifest.json."),
    debug: bool = DEBUG_OPTION,
) -> None:
    """Fetch the challenge's cached FineWeb shards and tokenizer (checked, resumable)."""

    def body() -> None:
        from pgolf.data.fineweb import dataset_name, fetch_fineweb, source_for

        target = out or Path("data") / dataset_name(variant)
        source = source_for(repo_id, local_repo, revision)
        console.print(f"[bold]pgolf data fineweb[/] {dataset_name(variant)} from {escape(source.description)} -> "
                      f"{escape(str(target))}")
        report = fetch_fineweb(source, target, variant=variant, train_shards=train_shards, remote_root=remote_root,
                               log=lambda line: console.print(line, markup=False, highlight=False))
        m = report.manifest
        console.print(f"{len(report.fetched)} file(s) fetched, {len(report.skipped)} already complete; "
                      f"{m['val_shards']} validation shard(s) ({m['tokens_val']:,} tokens), {m['train_shards']} training "
                      f"shard(s) ({m['tokens_train']:,} tokens), tokenizer {report.tokenizer.name}")
        vocab = "" if report.vocab_size == 1024 else f" --set model.vocab_size={report.vocab_size}"
        console.print(f"run with: pgolf run recipes/best.yaml --data {target}{vocab}", markup=False, highlight=False)

    guarded(debug, body)


def main() -> None:
    app(prog_name="pgolf")


if __name__ == "__main__":
    sys.exit(main())

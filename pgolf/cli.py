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


def recipe_overrides(scale: str | None, data: Path | None, tokenizer: Path | None, seed: int | None,
                     steps: int | None, sets: list[str]) -> list[str]:
    """CLI flags as `key=value` overrides, applied after the scale so they always win."""
    out: list[str] = []
    if data is not None:
        out.append(f"data.dir={json.dumps(str(data))}")
    if tokenizer is not None:
        out.append(f"data.tokenizer={json.dumps(str(tokenizer))}")
    if seed is not None:
        out.append(f"seed={seed}")
    if steps is not None:
        out += [f"train.iterations={steps}", "train.max_wallclock_seconds=0"]
    return out + list(sets)


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


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/best.yaml."),
    scale: str | None = typer.Option(None, help="Scale overlay, e.g. 'tiny' for a CPU run on the embedded corpus."),
    data: Path | None = typer.Option(None, help="Directory of challenge shards (fineweb_train_*.bin, fineweb_val_*.bin)."),
    tokenizer: Path | None = typer.Option(None, help="SentencePiece .model for --data."),
    seed: int | None = typer.Option(None, help="Random seed (default: the recipe's)."),
    steps: int | None = typer.Option(None, help="Step-matched mode: exactly N steps, no wallclock cap."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key.path=value (repeatable)."),
    out: Path | None = typer.Option(None, help="Run directory (default: runs/<recipe>-<scale>-seed<seed>-<time>)."),
    device: str | None = typer.Option(None, help="Force a device (cpu, cuda, cuda:1)."),
    strict: bool = typer.Option(False, help="Exit non-zero when any validity audit fails."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Run the whole lifecycle: data, train, average, export, round trip, eval, report."""

    def body() -> dict[str, Any]:
        from pgolf.lifecycle import init_distributed, run_recipe
        from pgolf.recipe import load_recipe

        r = load_recipe(recipe, recipe_overrides(scale, data, tokenizer, seed, steps, set_), scale=scale)
        out_dir = out or default_out_dir(r.name, r.scale, r.seed)
        main_rank = init_distributed().is_main
        reporter = RichReporter(enabled=main_rank)
        if main_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
            console.print(f"[bold]pgolf run[/] {recipe} -> {out_dir}")
        result = run_recipe(r, out_dir, reporter=reporter, device=device)
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
    tokenizer: Path | None = typer.Option(None, help="SentencePiece .model for --data."),
    with_: str = typer.Option("", "--with", help="Eval-stage techniques to add, comma-separated (e.g. sliding_window,ttt)."),
    recipe: Path | None = typer.Option(None, help="Recipe for a final_model.pt (default: recipes/baseline.yaml)."),
    scale: str | None = typer.Option(None, help="Scale overlay for --recipe."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe value: key.path=value (repeatable)."),
    out: Path | None = typer.Option(None, help="Write result.json here."),
    strict: bool = typer.Option(False, help="Exit non-zero when any validity audit fails."),
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Re-score a stored artifact (or a raw checkpoint) without retraining."""

    def body() -> dict[str, Any]:
        from pgolf.evalonly import evaluate_target

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
            debug: bool = typer.Option(False, help="Show tracebacks.")) -> None:
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
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Turn local text or JSONL into a tokenizer (the challenge's trainer settings) and train/val shards."""

    def body() -> None:
        from pgolf.errors import ConfigError
        from pgolf.textdata import build_dataset, read_documents, split_train_val, transform_by_name

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
    debug: bool = typer.Option(False, help="Show tracebacks."),
) -> None:
    """Fetch the challenge's cached FineWeb shards and tokenizer (checked, resumable)."""

    def body() -> None:
        from pgolf.fineweb import dataset_name, fetch_fineweb, source_for

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

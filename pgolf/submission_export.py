"""`pgolf export`: a run directory, or one arm of an ablation, as a challenge records folder.

The folder holds what the challenge asks a submission to add under `records/`: README.md (what ran,
the ablation table when the source is an ablation, the audits), submission.json in the layout the
records use (the one `pgolf.study.submissions` reads back: per-seed `seed_results`, the summary, the
`compliance` block, `logs`), one `train_seed<N>.log` per reported seed (the run's own log), the
requirements.txt of the code, and the single self-contained train_gpt.py (`pgolf.bundle`), whose
size is the submission's code bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pgolf
from pgolf.bundle import Bundle, build_bundle, requirements_for, submission_program
from pgolf.errors import ConfigError, DataError
from pgolf.products import ARTIFACT_FILE, MANIFEST_FILE, RESULT_FILE, Artifact, directory_reader, read_json

CODE_FILE = "train_gpt.py"
SUBMISSION_FILE = "submission.json"
CHALLENGE_TRAIN_SECONDS = 600.0
CHALLENGE_BUDGET_BYTES = 16_000_000
LOG_NAME = "train_seed{seed}.log"
STAGE_LOGS = ("train", "export", "eval")  # an ablation keeps one log per stage job, under logs/<stage>-<key>.log


@dataclass
class SeedRun:
    """One finished run of the exported recipe: what it scored, with what, and its log."""

    seed: int
    result: dict[str, Any]
    manifest: dict[str, Any]
    recipe: dict[str, Any]  # as written (the artifact's metadata): what the bundle embeds
    log: str
    origin: str  # the run directory, or the ablation run it was


@dataclass
class ExportSource:
    """The runs an export reports, and every seed that was launched."""

    kind: str  # "run" or "ablation"
    path: Path
    runs: list[SeedRun]
    launched: list[int]
    not_reported: dict[int, str] = field(default_factory=dict)  # seed -> why it has no result
    arm: str | None = None
    ablation_table: str | None = None


# --- reading the source ---------------------------------------------------------------------------


def read_source(path: Path, arm: str | None = None) -> ExportSource:
    """A run directory (result.json + artifact.pga) or an ablation directory (summary.json)."""
    path = Path(path)
    if (path / RESULT_FILE).is_file():
        if arm is not None:
            raise ConfigError("--arm names an arm of an ablation, but this is a run directory", file=str(path),
                              key="--arm", hint="Drop --arm, or pass the ablation directory.")
        run = read_run_dir(path)
        return ExportSource("run", path, [run], [run.seed])
    if (path / "summary.json").is_file():
        return read_ablation(path, arm)
    raise DataError(f"{path} is neither a run directory (result.json) nor an ablation directory (summary.json)",
                    hint="Pass what `pgolf run --out DIR` or `pgolf ablate` wrote.")


def read_run_dir(path: Path) -> SeedRun:
    read = directory_reader(path)
    result = read_json(path / RESULT_FILE, ("val_bpb", "val_loss", "seed"))
    manifest = read_json(path / MANIFEST_FILE)
    _, meta = Artifact(read(ARTIFACT_FILE), {}).decode()
    log = (path / "log.txt").read_text(encoding="utf-8") if (path / "log.txt").is_file() else ""
    return SeedRun(int(result["seed"]), result, manifest, meta["recipe"], log, str(path))


def read_ablation(path: Path, arm: str | None) -> ExportSource:
    from pgolf.study.cache import StageCache
    from pgolf.study.report import load_summary, render_markdown

    summary = load_summary(path)
    arms = {a["id"]: a for a in summary["arms"]}
    labels = {a["label"]: a["id"] for a in summary["arms"]}
    if arm is None and len(arms) == 1:
        arm = next(iter(arms))
    chosen = labels.get(arm, arm) if arm is not None else None
    if chosen not in arms:
        names = ", ".join(f"'{a['label']}'" for a in summary["arms"])
        raise ConfigError(f"{'no arm ' + repr(arm) if arm else 'the ablation has several arms'}", file=str(path),
                          key="--arm", hint=f"Pick one with --arm: {names}.")
    cache = StageCache(path / "cache")
    runs, launched, missing = [], [], {}
    for record in summary["runs"]:
        if record["arm"] != chosen:
            continue
        seed = int(record["seed"])
        launched.append(seed)
        if record.get("status") != "ok":
            missing[seed] = record.get("error") or record.get("status", "no result")
            continue
        keys = record["keys"]
        artifact = Artifact.read(cache.entry("export", keys["export"]), cache.reader("export", keys["export"]))
        _, meta = artifact.decode()
        manifest = cache.read_json("eval", keys["eval"], MANIFEST_FILE)
        logs = [path / "logs" / f"{stage}-{keys[stage]}.log" for stage in STAGE_LOGS]
        log = "".join(p.read_text(encoding="utf-8") for p in logs if p.is_file())
        runs.append(SeedRun(seed, record["result"], manifest, meta["recipe"], log,
                            f"{path} arm {arms[chosen]['label']} seed {seed}"))
    if not runs:
        raise DataError(f"arm '{arms[chosen]['label']}' of {path} has no finished run to export",
                        hint="Finish the ablation first (the same pgolf ablate command resumes it).")
    return ExportSource("ablation", path, runs, launched, missing, arms[chosen]["label"], render_markdown(summary))


# --- writing the folder ---------------------------------------------------------------------------


@dataclass
class Exported:
    out: Path
    bundle: Bundle
    submission: dict[str, Any]
    notes: list[str]


def export_submission(source_path: Path, out: Path, *, arm: str | None = None, base_pr: int | None = None,
                      keep_wallclock: bool = False, author: str | None = None, github_id: str | None = None,
                      name: str | None = None, log: Callable[[str], None] = print) -> Exported:
    """Write the records folder for a run or an ablation arm; returns what was written."""
    source = read_source(Path(source_path), arm)
    runs = sorted(source.runs, key=lambda r: source.launched.index(r.seed))
    head = runs[0]
    steps = {r.seed: int(r.result.get("steps") or 0) for r in runs}
    program = submission_program(head.recipe, steps, keep_wallclock=keep_wallclock)
    bundle = build_bundle(program)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty", hint="Pass a new folder to --out.")
    out.mkdir(parents=True, exist_ok=True)
    (out / CODE_FILE).write_text(bundle.text, encoding="ascii")
    notes = export_notes(source, runs, bundle, keep_wallclock)
    requirements = requirements_for(bundle.imports)
    (out / "requirements.txt").write_text(
        "# The third-party packages train_gpt.py imports (the versions it was exported with).\n"
        + "\n".join(requirements) + "\n", encoding="utf-8")
    for run in runs:
        (out / LOG_NAME.format(seed=run.seed)).write_text(run.log, encoding="utf-8")
    submission = submission_json(source, runs, bundle, base_pr=base_pr, author=author, github_id=github_id,
                                 name=name, keep_wallclock=keep_wallclock, notes=notes)
    (out / SUBMISSION_FILE).write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(readme(source, runs, bundle, submission, requirements, notes), encoding="utf-8")
    for note in notes:
        log(f"note: {note}")
    return Exported(out, bundle, submission, notes)


def export_notes(source: ExportSource, runs: list[SeedRun], bundle: Bundle, keep_wallclock: bool) -> list[str]:
    """What a reader of the folder must know that the figures alone do not say."""
    notes = []
    if source.not_reported:
        notes.append(f"{len(runs)} of {len(source.launched)} launched seeds are reported; not reported: "
                     + "; ".join(f"seed {s} ({why})" for s, why in source.not_reported.items()))
    if bundle.note:
        notes.append(bundle.note)
    counted = {r.seed: int(r.result.get("bytes_code", 0)) for r in runs}
    differ = {s: c for s, c in counted.items() if c != bundle.size}
    if differ:
        notes.append(f"{CODE_FILE} is {bundle.size:,} bytes; the runs counted "
                     + ", ".join(f"{c:,} (seed {s})" for s, c in differ.items())
                     + " for their own single-seed file (or an older pgolf's count); artifact bytes below use "
                       "this file")
    if not keep_wallclock and any(r.result.get("train", {}).get("stopped_early") for r in runs):
        notes.append(f"the runs stopped at their wallclock cap; {CODE_FILE} is step-matched to the steps each seed "
                     "reached (ITERATIONS per SEED, no cap), so it reproduces them on any hardware; export with "
                     "--keep-wallclock for the capped recipe")
    return notes


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _round(value: float | None, digits: int = 8) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def code_date() -> str | None:
    """The date of the pgolf commit the code came from (None outside a git checkout)."""
    root = Path(pgolf.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "show", "-s", "--format=%cs", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _track(recipe: dict[str, Any], runs: list[SeedRun]) -> str:
    train = recipe.get("train") or {}
    cap = float(train.get("max_wallclock_seconds") or 0)
    budget = int((recipe.get("export") or {}).get("budget_bytes", CHALLENGE_BUDGET_BYTES))
    on_shards = all(r.result.get("compliance", {}).get("data_fingerprint", {}).get("detail", {}).get("source")
                    == "shards" for r in runs)
    challenge_scale = recipe.get("scale") is None and on_shards
    if challenge_scale and 0 < cap <= CHALLENGE_TRAIN_SECONDS and budget <= CHALLENGE_BUDGET_BYTES:
        return "10min_16mb"
    return "non_record_16mb"


def compliance_block(runs: list[SeedRun]) -> dict[str, Any]:
    """The audits pgolf ran, as the records' compliance block states them (true only if every seed passed)."""
    def passed(audit: str) -> bool:
        return all(r.result["compliance"].get(audit, {}).get("passed", False) for r in runs)

    def verdict(policy: str) -> bool:
        return all(r.result["compliance"].get("time_budget", {}).get("detail", {}).get("verdicts", {}).get(policy, False)
                   for r in runs)

    audits = sorted({name for r in runs for name in r.result.get("compliance", {})})
    return {
        "artifact_under_16mb": passed("byte_budget"),
        "train_and_eval_under_600s_strict": verdict("strict"),
        "train_and_eval_under_600s_as_accepted": verdict("as-accepted"),
        "three_seeds": len(runs) >= 3,
        "full_validation_targets": not any(r.result.get("val_partial") for r in runs),
        "score_before_update": passed("score_before_update"),
        "no_validation_training_leak": passed("no_val_leakage"),
        "valid": all(r.result.get("valid") for r in runs),
        "pgolf_audits": {name: {str(r.seed): r.result["compliance"].get(name, {}).get("passed") for r in runs}
                         for name in audits},
    }


def submission_json(source: ExportSource, runs: list[SeedRun], bundle: Bundle, *, base_pr: int | None,
                    author: str | None, github_id: str | None, name: str | None, keep_wallclock: bool,
                    notes: list[str]) -> dict[str, Any]:
    """submission.json in the records' layout (per-seed `seed_results`, summary, compliance, logs)."""
    head = runs[0]
    recipe = head.recipe
    techniques = sorted(recipe.get("techniques") or {})
    per_seed: dict[str, dict[str, Any]] = {}
    for run in runs:
        r = run.result
        train = r.get("train") or {}
        per_seed[str(run.seed)] = {
            "val_loss": _round(r["val_loss"]), "val_bpb": _round(r["val_bpb"]),
            "artifact_bytes": int(r["bytes_model"]) + bundle.size, "bytes_model": int(r["bytes_model"]),
            "bytes_code": bundle.size, "steps": int(r.get("steps") or 0),
            "step_avg_ms": _round(float(r.get("step_avg_ms") or 0.0), 2),
            "train_wallclock_ms": round(1000 * float(r.get("train_seconds") or 0.0)),
            "eval_time_s": _round(float(r.get("eval_seconds") or 0.0), 1), "val_tokens": int(r["val_tokens"]),
            "val_bytes": int(r["val_bytes"]), "pre_quant_val_bpb": _round(r.get("val_bpb_prequant")),
            "stopped_early": bool(train.get("stopped_early")), "valid": bool(r.get("valid")),
        }
    bpb = [float(r.result["val_bpb"]) for r in runs]
    loss = [float(r.result["val_loss"]) for r in runs]
    artifact = [s["artifact_bytes"] for s in per_seed.values()]
    dates = sorted(str(r.manifest.get("created", ""))[:10] for r in runs if r.manifest.get("created"))
    results_date = dates[-1] if dates else dt.date.today().isoformat()
    label = f"{recipe.get('name', 'recipe')}{' (' + recipe['scale'] + ' scale)' if recipe.get('scale') else ''}"
    out: dict[str, Any] = {
        "author": author, "github_id": github_id,
        "name": name or f"pgolf {label}: {' + '.join(techniques) or 'baseline'}",
        "blurb": (f"pgolf recipe {label} with {', '.join(techniques) or 'no technique'}; {len(runs)} seed(s); "
                  f"{CODE_FILE} is the pgolf host, these techniques and the resolved recipe in one minified, "
                  f"lzma-compressed file" + ("" if keep_wallclock else ", step-matched to the steps each seed "
                                                                        "reached")),
        "date": results_date, "results_date": results_date, "code_date": code_date() or results_date,
        "track": _track(recipe, runs),
        "val_loss": _round(_mean(loss)), "val_bpb": _round(_mean(bpb)),
        "val_loss_std": _round(_std(loss)), "val_bpb_std": _round(_std(bpb)),
        "seeds": [r.seed for r in runs], "seed_results": per_seed,
        "launched_seeds": list(source.launched),
        "all_launched_seeds_reported": not source.not_reported,
    }
    if source.not_reported:
        out["seeds_not_reported"] = {str(s): why for s, why in source.not_reported.items()}
    if base_pr is not None:
        out["base_pr"] = base_pr
        out["comparison_baseline"] = f"PR #{base_pr}"
    out.update({
        "val_tokens": int(head.result["val_tokens"]),
        "bytes_code": bundle.size, "code_minified": bundle.minified,
        "artifact_bytes_mean": round(_mean([float(a) for a in artifact])), "artifact_bytes_max": max(artifact),
        "bytes_total": max(artifact),
        "train_steps_mean": _round(_mean([float(s["steps"]) for s in per_seed.values()]), 2),
        "train_wallclock_ms_mean": round(_mean([float(s["train_wallclock_ms"]) for s in per_seed.values()])),
        "train_wallclock_ms_max": max(s["train_wallclock_ms"] for s in per_seed.values()),
        "eval_time_s_mean": _round(_mean([float(s["eval_time_s"]) for s in per_seed.values()]), 1),
        "eval_time_s_max": max(float(s["eval_time_s"]) for s in per_seed.values()),
        "hardware": f"{head.manifest.get('world_size', 1)}x {head.manifest.get('device', 'unknown')}",
        "pytorch_version": head.manifest.get("torch"),
        "technique_summary": "; ".join(technique_lines(recipe)) or "the challenge baseline",
        "compliance": compliance_block(runs),
        "logs": {f"seed{r.seed}": LOG_NAME.format(seed=r.seed) for r in runs},
        "pgolf": {"version": pgolf.__version__, "git_sha": head.manifest.get("git_sha"), "recipe": recipe.get("name"),
                  "scale": recipe.get("scale"), "techniques": techniques, "source": source.kind,
                  "arm": source.arm, "step_matched": not keep_wallclock, "notes": notes},
    })
    return out


def technique_lines(recipe: dict[str, Any]) -> list[str]:
    """Each enabled technique with its parameters and the records it follows."""
    from pgolf.registry import load_technique_class

    lines = []
    for key, params in sorted((recipe.get("techniques") or {}).items()):
        cls = load_technique_class(key)
        shown = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
        lines.append(f"{key}{' (' + shown + ')' if shown else ''}: follows {cls.follows or '-'}")
    return lines


def readme(source: ExportSource, runs: list[SeedRun], bundle: Bundle, submission: dict[str, Any],
           requirements: tuple[str, ...], notes: list[str]) -> str:
    recipe = runs[0].recipe
    lines = [f"# {submission['name']}", "", submission["blurb"] + ".", ""]
    lines += [f"**val_bpb {submission['val_bpb']:.8f}**"
              + (f" (std {submission['val_bpb_std']:.8f}, {len(runs)} seeds)" if submission["val_bpb_std"] else
                 f" (1 seed: {runs[0].seed})"), ""]
    if submission.get("base_pr") is not None:
        lines += [f"Builds on PR #{submission['base_pr']}.", ""]
    lines += ["## What ran", "", f"- recipe `{recipe.get('name')}`" + (f", scale `{recipe['scale']}`"
                                                                      if recipe.get("scale") else "")
              + f", exported from the {source.kind} `{source.path}`" + (f", arm `{source.arm}`" if source.arm else ""),
              f"- pgolf {submission['pgolf']['version']} (git {submission['pgolf']['git_sha'] or 'unknown'}), "
              f"code date {submission['code_date']}, results date {submission['results_date']}",
              f"- hardware {submission['hardware']}, torch {submission['pytorch_version']}", "",
              "| technique | parameters | follows |", "|---|---|---|"]
    for key, params in sorted((recipe.get("techniques") or {}).items()):
        from pgolf.registry import load_technique_class

        shown = ", ".join(f"{k}={v}" for k, v in (params or {}).items()) or "defaults"
        lines.append(f"| `{key}` | {shown} | {load_technique_class(key).follows or '-'} |")
    if not recipe.get("techniques"):
        lines.append("| (none: the challenge baseline) | | |")
    lines += ["", "## Results", "", "| seed | val_bpb | val_loss | pre-quant val_bpb | steps | train s | eval s | "
              "model bytes | total bytes | valid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seed, s in submission["seed_results"].items():
        pre = f"{s['pre_quant_val_bpb']:.8f}" if s["pre_quant_val_bpb"] is not None else "-"
        lines.append(f"| {seed} | {s['val_bpb']:.8f} | {s['val_loss']:.8f} | {pre} | {s['steps']} | "
                     f"{s['train_wallclock_ms'] / 1000:.1f} | {s['eval_time_s']:.1f} | {s['bytes_model']:,} | "
                     f"{s['artifact_bytes']:,} | {'yes' if s['valid'] else 'no'} |")
    lines += ["", f"Launched seeds: {', '.join(map(str, submission['launched_seeds']))}"
              + ("" if submission["all_launched_seeds_reported"] else " (a subset is reported; see the notes)") + ".",
              "", "## Audits", "", "Every run was judged by pgolf's validity audits (result.json `compliance`):", "",
              "| audit | " + " | ".join(f"seed {r.seed}" for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for audit, by_seed in submission["compliance"]["pgolf_audits"].items():
        lines.append(f"| {audit} | " + " | ".join("pass" if by_seed.get(str(r.seed)) else "FAIL" for r in runs) + " |")
    if source.ablation_table:
        lines += ["", "## Ablation", "", f"The ablation this arm (`{source.arm}`) comes from:", "",
                  source.ablation_table.strip()]
    lines += ["", "## Code and bytes", "",
              f"`{CODE_FILE}` ({bundle.size:,} bytes, the counted code) holds {len(bundle.modules)} modules of pgolf "
              f"(the host and the enabled techniques; {bundle.raw_bytes:,} bytes of source), "
              + ("minified with python-minifier, " if bundle.minified else "NOT minified (python-minifier was "
                 "missing), ")
              + "lzma-compressed and base85-encoded, with the resolved recipe. It imports its modules from memory; "
                "pgolf need not be installed. Requirements: " + ", ".join(f"`{r}`" for r in requirements) + ".",
              "", "Run it as the challenge's script:", "", "```bash", "pip install -r requirements.txt",
              f"DATA_PATH=./data/datasets/fineweb10B_sp{(recipe.get('model') or {}).get('vocab_size', 1024)} "
              f"SEED={runs[0].seed} torchrun --standalone --nproc_per_node=8 {CODE_FILE}", "```", "",
              "`TOKENIZER_PATH` (default: beside the shards or in `../tokenizers/`), `SEED`, `ITERATIONS`, "
              "`MAX_WALLCLOCK_SECONDS`, `RUN_ID` and `RUN_DIR` (default `runs/<RUN_ID>`) are read as well."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"

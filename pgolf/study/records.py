"""A challenge records folder (records/track_10min_16mb/<date>_<name>/) read into a stored arm.

The folder's submission.json is read by `pgolf.study.submissions` (every layout it knows, and its
blocks such as `compliance_rerun`); every train log is parsed here; the two are cross-checked, and
the result is written to the records store (`pgolf.study.record_store`) with its provenance, for
`pgolf stats --new/--old record:NAME`.

What a train log prints, across the challenge's eras (read from the records themselves):

- March (`train.log`, `train_seed<N>.log`): often the script's own source first, ended by a line of
  `=`; then `key:value` lines (`model_params:17059912`, `seed:1337`, `train_seq_len:2048 iterations:20000`),
  `step:N/M ... train_time:<ms>ms` lines, `stopping_early: wallclock_cap train_time:<ms>ms step:N/M`,
  `Total submission size int8+zlib: <bytes> bytes`, and the scores as `<name> val_loss:X val_bpb:Y`
  (`final_int8_zlib_roundtrip_exact`, `final_sliding_window_exact`, `legal_ttt_exact`).
- April on: a `Hyperparameters:` block of `  key: value` lines (the source, when printed, follows a
  `Source code:` line between `=` lines), `val_tokens: N`, `model_params:N`, `N/M train_loss: ...`
  lines, `pre-quantization post-ema ...` (before quantization), then `quantized ...`,
  `quantized_sliding_window ...`, `quantized_ttt ...` or `quantized_ttt_phased ...`.

A log's final score is its last `<name> val_loss:X val_bpb:Y` line after quantization (a name saying
pre-quantization or post-EMA is the float model's score). The script's source, which many logs print
between `=` lines, is set aside first (a stretch that begins like Python), and the key:value header
is read only after the last `=` line before training starts. Some logs prefix every line with the
epoch time; it is dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pgolf
from pgolf.errors import PgolfError
from pgolf.study.judge import Source
from pgolf.study.record_store import (
    RECORD_PREFIX,
    arm_fields,
    arm_path,
    check_name,
    list_arms,
    read_arm,
    store_dir,
    write_arm,
)
from pgolf.study.stats import LN2, printed_precision
from pgolf.study.submissions import NoScoresError, read_submission

FLAG = "pgolf records import"
NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
EVAL_LINE = re.compile(rf"^(?P<name>[A-Za-z][\w+\-. ]*?)(?:\s+\w+[:=][^\s:=]+)*\s+val_loss[:=]\s*(?P<loss>{NUM})\s+"
                       rf"val_bpb[:=]\s*(?P<bpb>{NUM})(?=\s|$)")  # `final_sliding_window_eval_exact stride:64 val_loss:...`
TIMESTAMP = re.compile(r"^\d{9,}\.\d{1,6} ")  # some logs prefix every line with the epoch time
PREQUANT = re.compile(r"pre[-_ ]?quant|post[-_]ema", re.IGNORECASE)
SEPARATOR = re.compile(r"^={20,}\s*$")
PROGRESS = re.compile(r"^(?:\w*step:\s*|warmup:\s*)?\d+/\d+(?:\s|$)")  # warmup_step:1/20, step:0/20000, 500/20000
TRAIN_STEP = re.compile(r"^(?:step:)?(\d+)/(\d+)\s")
STEP_MS = re.compile(r"\btrain_time:\s*(\d+(?:\.\d+)?)ms\b")
STOPPED = re.compile(r"^stopping_early:.*?\btrain_time:\s*(\d+(?:\.\d+)?)ms\s+step:\s*(\d+)/(\d+)")
ARTIFACT = re.compile(r"^Total submission size(?: ([^:]+?))?:\s*(\d+) bytes")
BLOCK_PARAM = re.compile(r"^  (\w+):(?: (.*))?$")
CODE_START = re.compile(r"^(?:[\"']|#|@|import\s|from\s+\S+\s+import\s|def\s|class\s)")  # a printed script begins
ONE_PARAM = re.compile(r"^(\w+): (\S+)$")
COLON_TOKEN = re.compile(r"^(\w+):(\S+)$")
EQUALS_TOKEN = re.compile(r"^(\w+)=(\S*)$")
LOADER_TOKENS = re.compile(r"^val_loader:.*\btokens:(\d+)")
MODEL_PARAMS = re.compile(r"^model_params:\s*(\d+)\b")  # some add `(unique_layers:9 ...)` after the count
FILE_SEED = re.compile(r"seed[_-]?(\d+)", re.IGNORECASE)
INT = re.compile(r"^-?\d+$")
LOG_TXT_NAME = re.compile(r"log|train|seed", re.IGNORECASE)
FOLDER_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})_(.+)$")
README_PR = re.compile(r"(?:\bPR\s*#|/pull/)(\d+)")
LAYOUT = ("A records folder holds submission.json and its train logs (train_seed<N>.log, train.log, or logs/*.txt), "
          "as in records/track_10min_16mb/<date>_<name>/ of openai/parameter-golf.")


@dataclass
class Eval:
    """One `<name> val_loss:X val_bpb:Y` line of a log."""

    name: str
    val_loss: float
    val_bpb: float
    val_bpb_text: str  # as printed: its last digit is the figure's precision
    prequant: bool


@dataclass
class TrainLog:
    """What one train log states about its run."""

    file: str  # relative to the records folder
    sha256: str
    seed: int | None
    seed_from: str | None  # "log" or "file name"
    file_seed: int | None  # the seed the file name gives (train_seed42.log), which a log may contradict
    hyperparameters: dict[str, str]  # key -> value, as printed before training
    model_params: int | None
    val_tokens: int | None
    steps: int | None
    iterations: int | None
    train_time_ms: float | None
    stopped_early: bool
    artifact_bytes: int | None
    artifact_label: str | None  # the export the size line names, e.g. int8+zlib, quantized+brotli
    final: Eval
    evals: list[Eval]
    warnings: list[str] = field(default_factory=list)
    same_file_as: str | None = None  # an identical log already read (e.g. train.log beside train_seed1337.log)
    matches: list[str] = field(default_factory=list)  # the submission.json figures its final val_bpb agrees with


def parse_train_log(path: Path, relative: str) -> TrainLog:
    """A challenge train log's hyperparameters, model size, steps, artifact bytes and scores."""
    data = path.read_bytes()
    lines = _without_source([TIMESTAMP.sub("", line).rstrip()
                             for line in data.decode("utf-8", errors="replace").splitlines()])
    first_progress = next((i for i, line in enumerate(lines) if PROGRESS.match(line)), len(lines))
    header_start = max((i + 1 for i, line in enumerate(lines[:first_progress]) if SEPARATOR.match(line)), default=0)
    hyper = _hyperparameter_block(lines)
    for key, value in _header_params(lines[header_start:first_progress]).items():
        hyper.setdefault(key, value)
    evals = [_eval(m) for m in map(EVAL_LINE.match, lines) if m]
    finals = [e for e in evals if not e.prequant]
    if not finals:
        raise PgolfError("no final metrics: no line '<name> val_loss:X val_bpb:Y' after quantization (e.g. "
                         "'final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570' or 'quantized_ttt "
                         "val_loss:2.79180191 val_bpb:1.08079352')" + (f"; it has only {evals[-1].name}" if evals else ""),
                         file=str(path), hint="The run may have been cut off. Move the log out of the folder (and say so "
                                              "in the folder's README), or give the complete log, then import again.")
    seed, seed_from, file_seed, warnings = _seed(hyper.get("seed"), relative)
    steps, iterations, train_ms, stopped = _steps(lines)
    sizes = [m for m in map(ARTIFACT.match, lines) if m]
    header = lines[:first_progress]
    tokens = hyper.get("val_tokens") or next((m.group(1) for m in map(LOADER_TOKENS.match, header) if m), None)
    params = next((m.group(1) for m in map(MODEL_PARAMS.match, header) if m), None)
    return TrainLog(file=relative, sha256=hashlib.sha256(data).hexdigest(), seed=seed, seed_from=seed_from,
                    file_seed=file_seed, hyperparameters=hyper, model_params=_int(params), val_tokens=_int(tokens),
                    steps=steps, iterations=iterations, train_time_ms=train_ms, stopped_early=stopped,
                    artifact_bytes=int(sizes[-1].group(2)) if sizes else None,
                    artifact_label=sizes[-1].group(1) if sizes else None, final=finals[-1], evals=evals,
                    warnings=warnings)


def _without_source(lines: list[str]) -> list[str]:
    """The log without the script's source that many logs print: a stretch between `=` lines (or the
    file's start) whose first line, after any `Hyperparameters:` block, begins like Python."""
    keep = [True] * len(lines)
    bounds = [-1, *(i for i, line in enumerate(lines) if SEPARATOR.match(line)), len(lines)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        first = start + 1
        if first < end and lines[first] == "Hyperparameters:":
            first += 1
            while first < end and BLOCK_PARAM.match(lines[first]):
                first += 1
        first = next((i for i in range(first, end) if lines[i].strip()), end)
        if first < end and CODE_START.match(lines[first]):
            keep[first:end] = [False] * (end - first)
    return [line for line, kept in zip(lines, keep, strict=True) if kept]


def _hyperparameter_block(lines: list[str]) -> dict[str, str]:
    """The `  key: value` lines under a `Hyperparameters:` line (April-on logs)."""
    start = next((i for i, line in enumerate(lines) if line == "Hyperparameters:"), None)
    found: dict[str, str] = {}
    if start is None:
        return found
    for line in lines[start + 1:]:
        m = BLOCK_PARAM.match(line)
        if not m:
            break
        found.setdefault(m.group(1), m.group(2) or "")
    return found


def _header_params(lines: list[str]) -> dict[str, str]:
    """`key:value key:value`, `key=value ...` and `key: value` lines printed before training starts."""
    found: dict[str, str] = {}
    for line in lines:
        for key, value in _line_params(line):
            found.setdefault(key, value)
    return found


def _line_params(line: str) -> list[tuple[str, str]]:
    """A line's key/value pairs when it holds nothing else (mixed lines such as `sdp_backends:cudnn=False
    flash=True` or `val_bpb:enabled tokenizer_kind=...` are descriptions, not settings)."""
    one = ONE_PARAM.match(line)
    if one:
        return [(one.group(1), one.group(2))]
    tokens = line.split() if line and not line[0].isspace() else []
    for pattern in (COLON_TOKEN, EQUALS_TOKEN):
        pairs = [(m.group(1), m.group(2)) for token in tokens if (m := pattern.match(token))]
        if tokens and len(pairs) == len(tokens):
            return pairs
    return []


def _eval(m: re.Match[str]) -> Eval:
    name = m.group("name").strip()
    return Eval(name=name, val_loss=float(m.group("loss")), val_bpb=float(m.group("bpb")),
                val_bpb_text=m.group("bpb"), prequant=bool(PREQUANT.search(name)))


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and INT.match(text) else None


def _seed(printed: str | None, relative: str) -> tuple[int | None, str | None, int | None, list[str]]:
    """(seed, where it came from, the file name's seed, warnings): the seed the log prints, else its file
    name's; a disagreement is a warning."""
    named = FILE_SEED.search(Path(relative).name)
    from_name = int(named.group(1)) if named else None
    from_log = _int(printed)
    if from_log is not None:
        if from_name is not None and from_name != from_log:
            return from_log, "log", from_name, [f"{relative}: prints seed {from_log} but its file name says seed "
                                                f"{from_name}"]
        return from_log, "log", from_name, []
    return from_name, ("file name" if from_name is not None else None), from_name, []


def _steps(lines: list[str]) -> tuple[int | None, int | None, float | None, bool]:
    """(steps reached, iterations planned, training milliseconds, stopped by the wallclock cap)."""
    stops = [m for m in map(STOPPED.match, lines) if m]
    if stops:
        ms, step, total = stops[-1].groups()
        return int(step), int(total), float(ms), True
    steps = [(m, line) for line in lines if (m := TRAIN_STEP.match(line))]
    if not steps:
        return None, None, None, False
    m, line = steps[-1]
    timed = STEP_MS.search(line)
    return int(m.group(1)), int(m.group(2)), float(timed.group(1)) if timed else None, False


def find_logs(folder: Path) -> list[Path]:
    """`*.log` files, and `*.txt` files named like logs, in the folder and its `logs/` folder."""
    found = []
    for where in (folder, folder / "logs"):
        if where.is_dir():
            found += [p for p in where.iterdir() if p.is_file() and (
                p.suffix == ".log" or (p.suffix == ".txt" and LOG_TXT_NAME.search(p.stem)))]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _submission_file(folder: Path) -> Path | None:
    """submission.json, else the folder's only submission*.json (e.g. submission_ternary.json)."""
    if (folder / "submission.json").is_file():
        return folder / "submission.json"
    others = sorted(folder.glob("submission*.json"))
    return others[0] if len(others) == 1 else None


def _read_submission(file: Path, has_logs: bool) -> tuple[Source | None, dict[str, Source], dict[str, Any], list[str]]:
    """The main arm (None when the file states no scores and the logs will give them), its blocks, the raw
    object, and warnings about blocks that could not be read."""
    try:
        main: Source | None = read_submission(str(file), FLAG)
    except NoScoresError as exc:
        if not has_logs:
            raise PgolfError(f"{exc.message}, and the folder has no train log to take them from", file=exc.file,
                             hint="Add the per-seed results to submission.json (\"seed_results\": {\"42\": "
                                  "{\"val_bpb\": ...}}), or the train logs to the folder.") from None
        main = None
    raw = json.loads(file.read_text(encoding="utf-8"))  # read_submission has checked it is a JSON object
    taken = main.label.rpartition("@")[2] if main is not None and "@" in main.label else None
    blocks: dict[str, Source] = {}
    warnings = []
    for key, value in raw.items():
        if not isinstance(value, dict) or key in ("seed_results", "seeds", taken):
            continue
        try:
            block = read_submission(f"{file}@{key}", FLAG)
        except PgolfError as exc:
            warnings.append(f"block '{key}' of {file.name} was not read: {exc.render()}")
            continue
        if block.scores or block.reported is not None:
            blocks[key] = block
    return main, blocks, raw, warnings


def _half_unit(text: str) -> float:
    """Half a unit in the last printed digit of a figure written as text ('1.0810' -> 0.00005)."""
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def _agrees(value: Eval, figure: float) -> bool:
    """Equal to the precision either side printed (a submission that rounds to 5 digits still agrees)."""
    return abs(value.val_bpb - figure) <= max(printed_precision(figure), _half_unit(value.val_bpb_text)) * (1 + 1e-9)


def _seeds_of(run: TrainLog) -> set[int]:
    """The seeds a run may be: the one it prints and the one its file name gives (they can disagree)."""
    return {seed for seed in (run.seed, run.file_seed) if seed is not None}


def _is_of(run: TrainLog, seed: int) -> bool:
    return not _seeds_of(run) or seed in _seeds_of(run)


def _cross_check(runs: list[TrainLog], sources: dict[str, Source], listed: list[int], file_name: str) -> list[str]:
    """Warnings where the logs and submission.json disagree; sets each run's `matches`."""
    warnings: list[str] = []
    entries = [(label, seed, score) for label, source in sources.items()
               for seed, score in zip(source.seeds or [], source.scores, strict=True)]
    for run in runs:
        run.matches = list(dict.fromkeys(label for label, seed, score in entries
                                         if _is_of(run, seed) and _agrees(run.final, score)))
        if _seeds_of(run) and listed and not _seeds_of(run) & set(listed) and not run.matches:
            warnings.append(f"{run.file} is a run of seed {run.seed}, which {file_name} does not list "
                            f"(seeds {', '.join(map(str, listed))})")
    for label, seed, score in entries:
        if any(label in run.matches and _is_of(run, seed) for run in runs):
            continue
        of_seed = [run for run in runs if seed in _seeds_of(run)]
        if not of_seed:
            warnings.append(f"seed {seed} of {label} (val_bpb {score}) has no train log")
            continue
        said = "; ".join(f"{run.file} ends with {run.final.name} val_bpb {run.final.val_bpb_text}"
                         + "".join(f" (it prints {e.val_bpb_text} under {e.name})" for e in run.evals
                                   if e is not run.final and not e.prequant and _agrees(e, score))
                         for run in of_seed)
        warnings.append(f"seed {seed} of {label} (val_bpb {score}): no train log prints it to print precision; "
                        f"{said}")
    unlisted = [seed for seed in listed if not any(seed in _seeds_of(run) for run in runs)]
    if unlisted and not entries:
        warnings.append(f"{file_name} lists seed(s) {', '.join(map(str, unlisted))} but the folder has no train log "
                        "for them")
    return warnings


def _arm_from_logs(runs: list[TrainLog], main: Source | None, raw: dict[str, Any], file_name: str | None,
                   warnings: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The arm as the logs give it: one final val_bpb per log, checked against the submission's summary."""
    scores = [run.final.val_bpb for run in runs]
    seeds = [run.seed for run in runs]
    ratios = [run.final.val_bpb * LN2 / run.final.val_loss for run in runs if run.final.val_loss > 0]
    arm = {"scores": scores, "seeds": seeds if None not in seeds else None,
           "reported": arm_fields(main)["reported"] if main is not None else None,
           "tokens_per_byte": main.tokens_per_byte if main is not None and main.tokens_per_byte
           else (sum(ratios) / len(ratios) if ratios else None), "from": "logs"}
    notes = [f"{file_name or 'the folder'} gives no per-seed scores: the arm is each train log's final val_bpb"]
    for seed in sorted({seed for seed in seeds if seed is not None and seeds.count(seed) > 1}):
        files = [run.file for run in runs if run.seed == seed]
        warnings.append(f"seed {seed} has {len(files)} different train logs ({', '.join(files)}); the arm counts "
                        "each as a sample, and a paired test cannot use it")
    mean = sum(scores) / len(scores)
    if main is not None and main.reported is not None:
        reported = main.reported
        if reported.n != len(runs):
            warnings.append(f"{file_name} reports {reported.n} seeds but the folder holds {len(runs)} distinct "
                            "train log(s)")
        if abs(reported.mean - mean) > printed_precision(reported.mean) * (1 + 1e-9):
            warnings.append(f"{file_name} reports a mean val_bpb of {reported.mean}, the logs' finals average "
                            f"{mean:.8f}")
    headline = raw.get("val_bpb")
    if isinstance(headline, (int, float)) and not isinstance(headline, bool) and (main is None or main.reported is None):
        tolerance = printed_precision(float(headline)) * (1 + 1e-9)
        if not any(_agrees(run.final, float(headline)) for run in runs) and abs(mean - headline) > tolerance:
            warnings.append(f"{file_name}'s val_bpb {headline} is neither a log's final val_bpb nor their mean "
                            f"({mean:.8f})")
    return arm, notes


def _provenance(folder: Path, file: Path | None, logs: list[Path], pr: int | None) -> dict[str, Any]:
    """Where the arm came from: the folder, every file read (with its SHA-256), when, by which pgolf."""
    readme = folder / "README.md"
    code = sorted(folder.glob("train_gpt*.py"))
    read = [(file, "submission")] if file is not None else []
    read += [(readme, "readme")] if readme.is_file() else []
    read += [(p, "log") for p in logs] + [(p, "code") for p in code]
    files = []
    for path, role in read:
        data = path.read_bytes()
        files.append({"path": path.relative_to(folder).as_posix(), "role": role, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    named = FOLDER_NAME.match(folder.name)
    text = readme.read_text(encoding="utf-8", errors="replace") if readme.is_file() else ""
    title = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("# ")), None)
    mentioned = list(dict.fromkeys(int(n) for n in README_PR.findall(text)))
    return {"source": str(folder.resolve()), "folder": folder.name, "files": files,
            "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "pgolf_version": pgolf.__version__, "date": named.group(1) if named else None,
            "name": named.group(2) if named else folder.name, "readme_title": title, "pr": pr,
            "readme_prs": mentioned}


def default_name(folder: Path) -> str:
    """The folder's name, with anything a file name should not hold replaced by '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", folder.resolve().name).strip("._-")[:128]
    return cleaned or "record"


def import_records(folder: Path, *, name: str | None = None, store: Path | None = None, pr: int | None = None,
                   replace: bool = False) -> tuple[Path, dict[str, Any]]:
    """Read a records folder, cross-check it, and store it as an arm; returns its path and payload."""
    if not folder.is_dir():
        raise PgolfError("not a records folder" if folder.exists() else "no such folder", file=str(folder),
                         hint=LAYOUT)
    name = check_name(name) if name is not None else default_name(folder)
    path = arm_path(name, store)
    file = _submission_file(folder)
    log_files = find_logs(folder)
    if file is None and not log_files:
        others = sorted(p.name for p in folder.iterdir())
        raise PgolfError("neither a submission.json nor a train log found", file=str(folder),
                         hint=f"{LAYOUT} This folder holds: {', '.join(others) if others else 'nothing'}.")
    runs = [parse_train_log(p, p.relative_to(folder).as_posix()) for p in log_files]
    first_with: dict[str, str] = {}  # sha256 -> the first log with that content
    for run in runs:
        run.same_file_as = first_with.get(run.sha256)
        first_with.setdefault(run.sha256, run.file)
    distinct = [run for run in runs if run.same_file_as is None]
    warnings = [w for run in distinct for w in run.warnings]
    notes = [f"{run.file} is the same file as {run.same_file_as}" for run in runs if run.same_file_as]
    main, blocks, raw = None, {}, {}
    if file is None:
        warnings.append("no submission.json: the arm is each train log's final val_bpb, unchecked against a "
                        "submission")
    else:
        main, blocks, raw, block_warnings = _read_submission(file, bool(runs))
        warnings += block_warnings
    file_name = file.name if file is not None else None
    if main is not None and (main.scores or not distinct):
        arm = {**arm_fields(main), "from": file_name if main.scores else f"{file_name} (summary only)"}
    else:
        arm, arm_notes = _arm_from_logs(distinct, main, raw, file_name, warnings)
        notes += arm_notes
    if file is not None:
        sources = ({file.name: main} if main is not None and main.scores else {}) | {
            f"{file.name}@{key}": block for key, block in blocks.items() if block.scores}
        warnings += _cross_check(distinct, sources, _listed_seeds(main, raw), file.name)
    payload = {"name": name, "arm": arm,
               "blocks": {key: {**arm_fields(block), "from": f"{file_name}@{key}"} for key, block in blocks.items()},
               "runs": [_run_dict(run) for run in runs], "submission": raw, "warnings": warnings, "notes": notes,
               "provenance": _provenance(folder, file, log_files, pr)}
    _check_overwrite(path, payload, replace)
    write_arm(path, payload)
    return path, read_arm(path)


def _listed_seeds(main: Source | None, raw: dict[str, Any]) -> list[int]:
    """The seeds submission.json names: its per-seed results', else its `seeds` list."""
    if main is not None and main.seeds:
        return main.seeds
    listed = raw.get("seeds")
    return [s for s in listed if isinstance(s, int) and not isinstance(s, bool)] if isinstance(listed, list) else []


def _run_dict(run: TrainLog) -> dict[str, Any]:
    out = asdict(run)
    out.pop("warnings")  # kept in the arm's warnings
    return out


def _check_overwrite(path: Path, payload: dict[str, Any], replace: bool) -> None:
    """Refuse to replace an arm imported from other files unless asked (re-importing the same files is fine)."""
    if replace or not path.exists():
        return
    try:
        old = read_arm(path)
    except PgolfError as exc:
        raise PgolfError(f"a stored arm named '{payload['name']}' exists and is damaged ({exc.message})",
                         file=str(path), hint="Pass --replace to overwrite it.") from None
    same = [(f["path"], f["sha256"]) for f in old["provenance"]["files"]] == [
        (f["path"], f["sha256"]) for f in payload["provenance"]["files"]]
    if not same:
        raise PgolfError(f"a stored arm named '{payload['name']}' already exists, imported from other files "
                         f"({old['provenance']['source']} at {old['provenance']['imported_at']})", file=str(path),
                         hint="Pass --replace to overwrite it, or choose another --name.")


def summary_lines(path: Path, payload: dict[str, Any]) -> list[str]:
    """What `pgolf records import` prints: the arm, each run, the warnings."""
    arm, name = payload["arm"], payload["name"]
    pairs = (zip(arm["seeds"], arm["scores"], strict=True) if arm["seeds"] is not None
             else ((None, s) for s in arm["scores"]))
    scores = ", ".join(f"{seed}:{score}" if seed is not None else f"{score}" for seed, score in pairs)
    lines = [f"stored {RECORD_PREFIX}{name} -> {path}"]
    if arm["scores"]:
        lines.append(f"arm: {len(arm['scores'])} score(s) from {arm['from']}: {scores}; mean "
                     f"{sum(arm['scores']) / len(arm['scores']):.8f}")
    if arm["reported"]:
        r = arm["reported"]
        lines.append(f"reported: mean {r['mean']} std {r['std']} n {r['n']}")
    if payload["blocks"]:
        lines.append("blocks: " + ", ".join(f"{RECORD_PREFIX}{name}@{key} ({len(b['scores'])} scores)"
                                            for key, b in payload["blocks"].items()))
    for run in payload["runs"]:
        if run["same_file_as"]:
            lines.append(f"  {run['file']}: the same file as {run['same_file_as']}")
            continue
        final = run["final"]
        facts = [f"seed {run['seed']}" if run["seed"] is not None else "seed unknown",
                 f"{run['steps']}/{run['iterations']} steps" if run["steps"] is not None else None,
                 f"{run['train_time_ms'] / 1000:.1f} s" if run["train_time_ms"] is not None else None,
                 f"{run['model_params']:,} params" if run["model_params"] is not None else None,
                 f"{run['artifact_bytes']:,} bytes" if run["artifact_bytes"] is not None else None,
                 f"{final['name']} val_bpb {final['val_bpb_text']}",
                 f"= {', '.join(run['matches'])}" if run["matches"] else None]
        lines.append(f"  {run['file']}: " + ", ".join(f for f in facts if f))
    lines += [f"note: {n}" for n in payload["notes"]] + [f"warning: {w}" for w in payload["warnings"]]
    return lines


def list_rows(store: Path | None) -> tuple[Path, list[dict[str, Any]]]:
    """One row per stored arm for `pgolf records list`: damaged ones say why."""
    rows = []
    for path, payload in list_arms(store):
        if isinstance(payload, PgolfError):
            rows.append({"name": path.stem, "path": str(path), "status": "damaged", "error": payload.message})
            continue
        arm, prov = payload["arm"], payload["provenance"]
        scores = arm["scores"]
        mean = sum(scores) / len(scores) if scores else (arm["reported"] or {}).get("mean")
        rows.append({"name": payload["name"], "path": str(path), "status": "ok", "n": len(scores),
                     "mean_val_bpb": mean, "from": arm["from"],
                     "blocks": list(payload["blocks"]), "warnings": len(payload["warnings"]), "pr": prov["pr"],
                     "date": prov["date"], "folder": prov["folder"], "source": prov["source"],
                     "imported_at": prov["imported_at"]})
    return store_dir(store), rows

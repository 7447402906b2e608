"""The arms `pgolf stats` compares, read from what people publish: score lists, submission.json, records folders.

submission.json has no schema (../shared/reference/challenge.md §4.3); the layouts read here are
the ones the records use. Per-seed results: `seed_results` or `seeds` mapping each seed to
{"val_bpb": ...} (or to the score), `seeds` with a parallel `seed_scores` list, or a mapping of
seed to score under a key naming val_bpb (`all_7_val_bpb`). A summary: the mean under `val_bpb`,
`mean_val_bpb`, `mean_bpb` or `<prefix>_mean_bpb`, the std under `val_bpb_std`, `std_val_bpb`,
`std_bpb` or `<prefix>_std_bpb`, and n from `n_seeds`, the `seeds` list or the per-seed count.
Figures kept in one nested block (`results`) are read from it; `PATH@KEY` reads another block,
such as a compliance rerun or every disclosed run, and the output names blocks left unread.
`record:NAME[@KEY]` reads an arm that `pgolf records import` stored (pgolf/study/record_store.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.study.judge import Source
from pgolf.study.record_store import RECORD_PREFIX, record_source
from pgolf.study.stats import LN2, Summary

EXAMPLE = "For example: 1.0811,1.0809,1.0815, or 42:1.0811,314:1.0809, or records/track_10min_16mb/FOLDER"
EXPECTED = ("per-seed results (`seed_results` or `seeds` mapping each seed to {\"val_bpb\": ...}, or `seeds` with "
            "`seed_scores`) or a summary (`val_bpb` with `val_bpb_std` or `std_bpb`)")
MEAN_NAMES = ("val_bpb", "mean_val_bpb", "mean_bpb", "val_bpb_mean")
STD_NAMES = ("val_bpb_std", "std_val_bpb", "std_bpb")
MEAN_KEY = re.compile(r"^\w+_mean_(?:val_)?bpb$")  # rerun_mean_bpb, all_7_mean_val_bpb
STD_KEY = re.compile(r"^\w+_std_(?:val_)?bpb$")
SEED = re.compile(r"^-?\d+$")


class NoScoresError(PgolfError):
    """A submission.json that states neither per-seed scores nor a full summary (its logs may)."""


def read_arm(values: Sequence[str], flag: str) -> list[Source]:
    """The sources of one arm: each value is a comma list of scores, or of submission paths (pooled)."""
    sources: list[Source] = []
    for value in values:
        items = [x.strip() for x in value.split(",") if x.strip()]
        if not items:
            raise PgolfError(f"{flag} is empty", hint=EXAMPLE + ".")
        parsed = [None if Path(x).exists() else _score_item(x) for x in items]  # a file named 1.08 is a file
        if all(p is not None for p in parsed):
            sources.append(_list_source(value, [p for p in parsed if p is not None], flag))
        elif any(p is not None for p in parsed) or all(not _looks_like_path(x) for x in items):
            bad = next(x for x, p in zip(items, parsed, strict=True) if p is None)
            raise PgolfError(f"{flag} expects comma-separated numbers (or paths to submission.json files or records "
                             f"folders), got '{value}': '{bad}' is not a number", hint=EXAMPLE + ".")
        else:
            sources.extend(read_submission(x, flag) for x in items)
    return sources


def _score_item(text: str) -> tuple[int | None, float] | None:
    """'1.0801' or '42:1.0801' as (seed, score); None when it is not a finite number."""
    seed_text, _, score_text = text.rpartition(":")
    try:
        score = float(score_text)
    except ValueError:
        return None
    if not math.isfinite(score) or (seed_text and not SEED.match(seed_text)):
        return None
    return (int(seed_text) if seed_text else None), score


def _looks_like_path(text: str) -> bool:
    return text.startswith(RECORD_PREFIX) or "/" in text or "\\" in text or text.endswith(".json") or Path(text.rpartition("@")[0] or text).exists()


def _list_source(value: str, parsed: list[tuple[int | None, float]], flag: str) -> Source:
    seeds = [seed for seed, _ in parsed]
    if any(s is None for s in seeds) and any(s is not None for s in seeds):
        raise PgolfError(f"{flag} '{value}' names the seed of some scores but not of others",
                         hint="Write every score as seed:score, or none.")
    named = [s for s in seeds if s is not None]
    return Source(label=value, scores=[score for _, score in parsed], seeds=named if named else None)


def read_submission(spec: str, flag: str) -> Source:
    """One submission.json (or records folder holding one), optionally one block of it (PATH@KEY);
    `record:NAME[@KEY]` reads an arm stored by `pgolf records import`."""
    if spec.startswith(RECORD_PREFIX):
        return record_source(spec[len(RECORD_PREFIX):], flag)
    path_text, block = spec, None
    if not Path(spec).exists() and "@" in spec:
        path_text, _, block = spec.rpartition("@")
    path = Path(path_text)
    file = path / "submission.json" if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            others = sorted(p.name for p in path.glob("*.json"))
            raise PgolfError(f"the folder has no submission.json (given to {flag})", file=str(path),
                             hint=(f"It holds {', '.join(others)}; pass one of them as the path." if others
                                   else "Point at a records folder, e.g. records/track_10min_16mb/FOLDER."))
        raise PgolfError(f"no such file or folder (given to {flag})", file=path_text,
                         hint="Give comma-separated val_bpb scores, a submission.json, or a records folder holding one.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PgolfError(f"not valid JSON ({exc.msg})", file=str(file), line=exc.lineno,
                         hint="Fix the file, or give the scores as a comma list.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PgolfError(f"cannot be read ({exc})", file=str(file), hint="Check the path and its permissions.") from None
    if not isinstance(data, dict):
        raise PgolfError(f"expected a JSON object, found {type(data).__name__}", file=str(file), hint=EXPECTED + ".")
    blocks = _blocks_with_scores(data)
    if block is not None:
        obj = _select(data, block, file, blocks)
        return _source(obj, spec, file, block + ".")
    source = _source(data, spec, file, "")
    if not source.scores and source.reported is None and len(blocks) == 1:
        return _source(data[blocks[0]], f"{spec}@{blocks[0]}", file, blocks[0] + ".")
    if not source.scores and source.reported is None:
        inside = f"; its blocks {', '.join(blocks)} hold scores: pick one with {spec}@KEY" if blocks else ""
        raise NoScoresError("no val_bpb scores found", file=str(file),
                         hint=f"Expected {EXPECTED}{inside}. Or give the scores as a comma list.")
    if blocks:
        source.notes.append(f"{spec} also holds per-seed results or a summary under "
                            + ", ".join(f"'{b}'" for b in blocks) + f" (read one with {spec}@KEY)")
    return source


def _select(data: dict[str, Any], block: str, file: Path, blocks: list[str]) -> dict[str, Any]:
    obj: Any = data
    for part in block.split("."):
        if not isinstance(obj, dict) or part not in obj:
            have = f"blocks with scores: {', '.join(blocks)}" if blocks else "no nested block holds scores"
            raise PgolfError(f"no block '{block}' in the file", file=str(file), key=block, hint=f"It has {have}.")
        obj = obj[part]
    if not isinstance(obj, dict):
        raise PgolfError(f"'{block}' is a {type(obj).__name__}, not a block of results", file=str(file), key=block,
                         hint=f"Expected a JSON object holding {EXPECTED}.")
    return obj


def _blocks_with_scores(data: dict[str, Any]) -> list[str]:
    """Top-level keys whose object holds per-seed results or a summary of its own."""
    found = []
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("seed_results", "seeds"):
            try:
                if _per_seed(value, Path(), "") or _summary(value, 0) is not None:
                    found.append(key)
            except PgolfError:
                found.append(key)  # malformed, but meant as results: reading it names the problem
    return found


def _source(obj: dict[str, Any], label: str, file: Path, where: str) -> Source:
    rows = _per_seed(obj, file, where)
    if not rows and _summary(obj, 0) is None and isinstance(obj.get("seed"), int) and _number(obj.get("val_bpb")):
        rows = [(obj["seed"], float(obj["val_bpb"]), _number(obj.get("val_loss")))]  # one run, one seed
    return Source(label=label, scores=[bpb for _, bpb, _ in rows], seeds=[seed for seed, _, _ in rows] or None,
                  reported=_summary(obj, len(rows)), tokens_per_byte=_tokens_per_byte(obj, rows))


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _per_seed(obj: dict[str, Any], file: Path, where: str) -> list[tuple[int, float, float | None]]:
    """(seed, val_bpb, val_loss or None) for each seed the block reports, in file order."""
    for key in ("seed_results", "seeds"):
        if isinstance(obj.get(key), dict) and obj[key]:
            return _seed_map(obj[key], file, where + key)
    seeds, scores = obj.get("seeds"), obj.get("seed_scores")
    if isinstance(seeds, list) and isinstance(scores, list):
        if len(seeds) != len(scores):
            raise PgolfError(f"{len(seeds)} seeds but {len(scores)} seed_scores", file=str(file),
                             key=where + "seed_scores", hint="Expected one score per seed, in the same order.")
        return [(_seed(s, file, where + "seeds"), _score(x, file, f"{where}seed_scores[{i}]"), None)
                for i, (s, x) in enumerate(zip(seeds, scores, strict=True))]
    for key, value in obj.items():
        if "val_bpb" in key and isinstance(value, dict) and value and all(SEED.match(str(k)) for k in value):
            return _seed_map(value, file, where + key)
    return []


def _seed_map(mapping: dict[str, Any], file: Path, key: str) -> list[tuple[int, float, float | None]]:
    rows = []
    for seed_text, entry in mapping.items():
        seed = _seed(seed_text, file, key)
        if isinstance(entry, dict):
            rows.append((seed, _score(entry.get("val_bpb"), file, f"{key}.{seed_text}.val_bpb"),
                         _number(entry.get("val_loss"))))
        else:
            rows.append((seed, _score(entry, file, f"{key}.{seed_text}"), None))
    return rows


def _seed(value: Any, file: Path, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and SEED.match(value):
        return int(value)
    raise PgolfError(f"'{value}' is not a seed number", file=str(file), key=key,
                     hint="Expected seeds as integers (e.g. \"42\": {\"val_bpb\": 1.0811}).")


def _score(value: Any, file: Path, key: str) -> float:
    number = _number(value)
    if number is None:
        raise PgolfError(f"expected a finite val_bpb number, found {json.dumps(value)}", file=str(file), key=key,
                         hint="Fix the entry, or give the scores as a comma list.")
    return number


def _first(obj: dict[str, Any], names: Sequence[str], pattern: re.Pattern[str]) -> float | None:
    """The first number under one of `names`, else under the first key matching `pattern`."""
    for key in [*names, *(k for k in obj if pattern.match(k))]:
        number = _number(obj.get(key))
        if number is not None:
            return number
    return None


def _summary(obj: dict[str, Any], per_seed_count: int) -> Summary | None:
    """Mean, std and n as the block states them; None unless all three are there."""
    mean, std = _first(obj, MEAN_NAMES, MEAN_KEY), _first(obj, STD_NAMES, STD_KEY)
    n_seeds = obj.get("n_seeds")
    if isinstance(n_seeds, int) and not isinstance(n_seeds, bool):
        n = n_seeds
    elif isinstance(obj.get("seeds"), (list, dict)):
        n = len(obj["seeds"])
    else:
        n = per_seed_count
    if mean is None or std is None or n < 1:
        return None
    return Summary(mean, std, n)


def _tokens_per_byte(obj: dict[str, Any], rows: list[tuple[int, float, float | None]]) -> float | None:
    """val_bpb * ln 2 / val_loss: per seed where both are given, else from the block's means."""
    ratios = [bpb * LN2 / loss for _, bpb, loss in rows if loss]
    if ratios:
        return sum(ratios) / len(ratios)
    for bpb_key, loss_key in (("val_bpb", "val_loss"), ("mean_val_bpb", "mean_val_loss")):
        bpb, loss = _number(obj.get(bpb_key)), _number(obj.get(loss_key))
        if bpb and loss:
            return bpb * LN2 / loss
    return None

"""Stored arms: a challenge records folder, imported once, kept as one verified JSON file per name.

`pgolf records import` (pgolf/study/records.py) writes them; `record:NAME` in any `--new`/`--old`
reads them back through `pgolf.study.submissions`. The store is `$PGOLF_RECORDS_DIR`, else
`records/` under pgolf's cache (`~/.cache/pgolf/records`, moved by `PGOLF_CACHE_DIR`): an arm is
derived data (its provenance names the folder and each file's SHA-256, so it can be imported again),
and a `records/` folder in the working directory would mix with the challenge's own `records/` when
pgolf runs inside a parameter-golf checkout. A file is written under a temporary name and renamed
into place, and it carries the SHA-256 of its own canonical JSON, checked on every read, so a
damaged or hand-edited arm is one clear error rather than wrong figures.

This module imports no torch and nothing above the study's judge, so `pgolf stats` stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from pgolf.data.corpus import cache_dir
from pgolf.errors import PgolfError
from pgolf.study.judge import Source
from pgolf.study.stats import Summary

RECORD_PREFIX = "record:"
FORMAT = "pgolf-record/1"
STORE_ENV = "PGOLF_RECORDS_DIR"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CHECKSUM_KEY = "sha256"
TEMP_PREFIX = ".tmp-"


def store_dir(store: Path | None = None) -> Path:
    """The records store: the given folder, else $PGOLF_RECORDS_DIR, else <pgolf cache>/records."""
    if store is not None:
        return store
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else cache_dir() / "records"


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise PgolfError(f"'{name}' cannot name a stored arm", key="--name",
                         hint="Use letters, digits, '.', '_' or '-' (at most 128, starting with a letter or digit), "
                              "e.g. --name pr1514.")
    return name


def arm_path(name: str, store: Path | None = None) -> Path:
    return store_dir(store) / f"{check_name(name)}.json"


def checksum(payload: dict[str, Any]) -> str:
    """SHA-256 of the payload's canonical JSON, its own checksum field left out."""
    body = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_arm(path: Path, payload: dict[str, Any]) -> None:
    """Seal the payload with its checksum and write it atomically (a crash leaves no half file)."""
    sealed = {"format": FORMAT, **{k: v for k, v in payload.items() if k not in ("format", CHECKSUM_KEY)}}
    sealed[CHECKSUM_KEY] = checksum(sealed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(sealed, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_arm(path: Path) -> dict[str, Any]:
    """A stored arm, verified against its own checksum."""
    if not path.is_file():
        raise PgolfError("no such stored arm", file=str(path),
                         hint="Import the records folder first with `pgolf records import DIR --name NAME`; "
                              "`pgolf records list` shows the arms stored.")
    damaged = "Import the records folder again with `pgolf records import DIR --name NAME --replace`."
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PgolfError(f"the stored arm is damaged: not valid JSON ({exc.msg})", file=str(path), line=exc.lineno,
                         hint=damaged) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PgolfError(f"the stored arm cannot be read ({exc})", file=str(path),
                         hint="Check the path and its permissions.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise PgolfError(f"not a stored arm of format {FORMAT} (found {json.dumps(found)})", file=str(path),
                         key="format", hint=damaged)
    if payload.get(CHECKSUM_KEY) != checksum(payload):
        raise PgolfError("the stored arm is damaged: its contents do not match its own SHA-256 (edited or truncated "
                         "since import)", file=str(path), key=CHECKSUM_KEY, hint=damaged)
    return payload


def list_arms(store: Path | None = None) -> list[tuple[Path, dict[str, Any] | PgolfError]]:
    """Every arm in the store, in name order: its verified payload, or the error that reading it raised."""
    folder = store_dir(store)
    if not folder.is_dir():
        return []
    found: list[tuple[Path, dict[str, Any] | PgolfError]] = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(TEMP_PREFIX):
            continue
        try:
            found.append((path, read_arm(path)))
        except PgolfError as exc:
            found.append((path, exc))
    return found


def record_source(spec: str, flag: str) -> Source:
    """`NAME[@BLOCK]` (in the store) or `PATH.json[@BLOCK]` as the source of one arm."""
    target, _, block = spec.partition("@")
    if not target:
        raise PgolfError(f"{flag} {RECORD_PREFIX}{spec} names no stored arm",
                         hint=f"Write {RECORD_PREFIX}NAME, as listed by `pgolf records list`.")
    by_path = target.endswith(".json") or "/" in target or "\\" in target
    path = Path(target) if by_path else arm_path(target)
    payload = read_arm(path)
    label = f"{RECORD_PREFIX}{spec}"
    blocks = payload.get("blocks", {})
    if block:
        if block not in blocks:
            have = ", ".join(blocks) if blocks else "none"
            raise PgolfError(f"the stored arm has no block '{block}' (given to {flag})", file=str(path), key=block,
                             hint=f"Its blocks with scores: {have}.")
        arm = blocks[block]
    else:
        arm = payload["arm"]
    source = _source(arm, label)
    source.notes += [f"{label}: at import: {w}" for w in payload.get("warnings", [])]
    if blocks and not block:
        source.notes.append(f"{label} also holds " + ", ".join(f"'{b}'" for b in blocks)
                            + f" (read one with {label}@KEY)")
    return source


def _source(arm: dict[str, Any], label: str) -> Source:
    reported = arm.get("reported")
    return Source(label=label, scores=[float(x) for x in arm.get("scores", [])], seeds=arm.get("seeds"),
                  reported=Summary(reported["mean"], reported["std"], reported["n"]) if reported else None,
                  tokens_per_byte=arm.get("tokens_per_byte"))


def arm_fields(source: Source) -> dict[str, Any]:
    """What a stored arm keeps of a judged source (the inverse of reading it back)."""
    reported = source.reported
    return {"scores": list(source.scores), "seeds": source.seeds,
            "reported": {"mean": reported.mean, "std": reported.std, "n": reported.n} if reported else None,
            "tokens_per_byte": source.tokens_per_byte}

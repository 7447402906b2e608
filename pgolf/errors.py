"""User-facing errors.

Anything the user can fix (a bad recipe, missing data, an unknown technique) raises
`PgolfError`. The CLI prints its message as one paragraph and exits non-zero without a
traceback; `--debug` shows the traceback. Bugs in pgolf stay ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PgolfError(Exception):
    """An error the user can fix; the message says where, what was expected and what to try."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = []
        if self.file:
            where.append(f"{self.file}" + (f", line {self.line}" if self.line else ""))
        if self.key:
            where.append(f"key '{self.key}'")
        text = (": ".join([", ".join(where), self.message]) if where else self.message).rstrip()
        if self.hint:
            text = text.rstrip(".") + ". " + self.hint
        return text


class ConfigError(PgolfError):
    """A recipe or override is wrong."""


class ConfigErrors(ConfigError):
    """Several user-fixable problems found in one pass, reported together.

    Renders a first line with the count, then each problem as its own numbered line in the
    single-error format (file, line, key, what was expected, the suggestion). `errors` keeps
    the individual errors, so callers and tests can inspect each one.
    """

    def __init__(self, errors: Iterable[PgolfError]) -> None:
        self.errors = flatten_errors(errors)
        first = self.errors[0] if self.errors else None
        super().__init__(
            f"{len(self.errors)} problems found",
            file=first.file if first else None,
            line=first.line if first else None,
            key=first.key if first else None,
        )

    def render(self) -> str:
        items = [f"  {i}. {e.render()}" for i, e in enumerate(self.errors, 1)]
        return "\n".join([f"{len(self.errors)} problems found:", *items])


def flatten_errors(errors: Iterable[PgolfError]) -> list[PgolfError]:
    """Expand aggregates into their single errors, dropping exact repeats, in order."""
    out: list[PgolfError] = []
    seen: set[str] = set()
    for e in errors:
        for single in e.errors if isinstance(e, ConfigErrors) else [e]:
            text = single.render()
            if text not in seen:
                seen.add(text)
                out.append(single)
    return out


def raise_collected(errors: Iterable[PgolfError]) -> None:
    """Raise nothing for no problems, the error itself for one (rendered exactly as a lone
    error, type kept), and a `ConfigErrors` listing them all for several."""
    flat = flatten_errors(errors)
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise ConfigErrors(flat)


class DataError(PgolfError):
    """Shards, tokenizer or text inputs are missing or corrupt."""


class RegistryError(PgolfError):
    """Techniques cannot be combined, found or ordered."""


class TrainingError(PgolfError):
    """Training diverged (NaN loss) or could not start."""


def suggest(name: str, choices: Iterable[str]) -> str | None:
    """'Did you mean ...?' for the closest valid name, or None when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"Did you mean '{close[0]}'?" if close else None

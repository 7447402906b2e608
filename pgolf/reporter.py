"""Where a run reports: plain lines on stdout and in the run's log.txt (the CLI adds a progress bar)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Reporter:
    def __init__(self, log_path: Path | None = None, quiet: bool = False) -> None:
        self.log_path = log_path
        self.quiet = quiet

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)
        self.write(message)

    def write(self, message: str) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(message + "\n")

    def stage(self, name: str) -> None:
        self.log(f"== {name}")

    def progress(self, info: dict[str, Any]) -> None:
        """Called after every training step with step, loss, elapsed, tokens_per_s, cap, iterations."""

    def done(self) -> None:
        """Training finished; close any progress display."""

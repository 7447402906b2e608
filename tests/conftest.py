"""Shared fixtures: an isolated pgolf cache per test session and micro-sized recipes.

The embedded corpus and its tokenizer are built once per session into a temporary cache
(PGOLF_CACHE_DIR), so tests never touch the user's cache and never download anything.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The official tokenizers live in ../shared; PGOLF_TOKENIZERS_DIR points elsewhere (a git worktree).
TOKENIZERS = Path(os.environ.get("PGOLF_TOKENIZERS_DIR") or REPO.parent / "shared" / "tokenizers")

_SESSION_CACHE = os.environ.get("PGOLF_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="pgolf-test-cache-")
os.environ["PGOLF_CACHE_DIR"] = _SESSION_CACHE

from pgolf.testing import MICRO  # noqa: E402  (after the cache is set: one list for pgolf's tests and third parties)
from pgolf.testing import micro_recipe as _micro_recipe  # noqa: E402

__all__ = ["MICRO", "REPO", "TOKENIZERS", "official_tokenizer", "pinned_thread_env", "pinned_threads"]


# Tests that compare a run in this process with a run in other processes (torchrun ranks) assert
# bit identity, and CPU reductions split work by the intra-op thread count: both sides run on
# this many threads, whatever the machine's core count or the caller's environment.
PINNED_THREADS = 1


def pinned_thread_env() -> dict[str, str]:
    """The environment variables that give a child process PINNED_THREADS intra-op threads."""
    return {"OMP_NUM_THREADS": str(PINNED_THREADS), "MKL_NUM_THREADS": str(PINNED_THREADS)}


@contextlib.contextmanager
def pinned_threads() -> Iterator[None]:
    """Run this process's torch ops on PINNED_THREADS threads, restoring the previous count after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(PINNED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def official_tokenizer(name: str) -> Path:
    path = TOKENIZERS / name
    if not path.is_file():
        pytest.skip(f"official tokenizer {name} is not present (../shared/tokenizers)")
    return path


@pytest.fixture
def micro_recipe():
    """Build a micro-sized recipe (baseline + tiny scale + MICRO + overrides): `pgolf.testing.micro_recipe`."""
    return _micro_recipe


def cli_imports_torch(*args: str) -> bool:
    """Whether `pgolf ARGS` (which must succeed) imports torch, in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from pgolf.cli import app; "
            f"r = CliRunner().invoke(app, {list(args)!r}); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


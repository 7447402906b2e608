"""Shared fixtures: an isolated pgolf cache per test session and micro-sized recipes.

The embedded corpus and its tokenizer are built once per session into a temporary cache
(PGOLF_CACHE_DIR), so tests never touch the user's cache and never download anything.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The official tokenizers live in ../shared; PGOLF_TOKENIZERS_DIR points elsewhere (a git worktree).
TOKENIZERS = Path(os.environ.get("PGOLF_TOKENIZERS_DIR") or REPO.parent / "shared" / "tokenizers")

_SESSION_CACHE = os.environ.get("PGOLF_TEST_CACHE_DIR") or tempfile.mkdtemp(prefix="pgolf-test-cache-")
os.environ["PGOLF_CACHE_DIR"] = _SESSION_CACHE

# A run small enough for a unit test (seconds on 2 CPU cores), applied on top of --scale tiny.
MICRO = [
    "model.num_layers=2", "model.model_dim=64", "model.num_heads=2", "model.num_kv_heads=1",
    "train.seq_len=64", "train.batch_tokens=1024", "train.warmup_steps=1", "train.iterations=3",
    "train.max_wallclock_seconds=0", "train.log_every=1", "eval.batch_tokens=4096", "eval.max_tokens=4097",
    "eval.audit_positions=4", "export.keep_float_max_numel=1024",
]


def official_tokenizer(name: str) -> Path:
    path = TOKENIZERS / name
    if not path.is_file():
        pytest.skip(f"official tokenizer {name} is not present (../shared/tokenizers)")
    return path


@pytest.fixture
def micro_recipe():
    """Build a micro-sized recipe (baseline + tiny scale + MICRO + overrides)."""
    from pgolf.recipe import load_recipe

    def make(*overrides: str, techniques: dict | None = None, recipe: Path = REPO / "recipes" / "baseline.yaml"):
        r = load_recipe(recipe, [*MICRO, *overrides], scale="tiny")
        r.techniques.update(techniques or {})  # names like "module:Class" cannot go through dotted overrides
        return r

    return make

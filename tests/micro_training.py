"""Train one micro model and export it under different technique sets (export-stage tests share it)."""

from __future__ import annotations

from typing import Any

from pgolf.api import Technique
from pgolf.artifact import decode_artifact
from pgolf.host import Session, export_stage, load_data, train_stage
from pgolf.products import Artifact, Checkpoint
from pgolf.recipe import Recipe, load_recipe
from pgolf.reporter import Reporter
from tests.conftest import MICRO, REPO

QUIET = Reporter(quiet=True)


def train_micro() -> Checkpoint:
    session = Session(load_recipe(REPO / "recipes" / "baseline.yaml", MICRO, scale="tiny"), reporter=QUIET)
    load_data(session)
    return train_stage(session)


def export_with(recipe: Recipe, checkpoint: Checkpoint) -> tuple[Session, Artifact]:
    """Export the already trained model under `recipe`'s techniques, as an ablation reusing a checkpoint."""
    session = Session(recipe, reporter=QUIET)
    load_data(session)
    return session, export_stage(session, checkpoint)


def technique(session: Session, name: str) -> Technique:
    """The enabled instance of technique `name` in `session` (tests inspect its state and metrics)."""
    matches = [e.instance for e in session.enabled if e.name == name]
    assert matches, f"{name} is not enabled in this session"
    return matches[0]


def stored_tensors(blob: bytes) -> dict[str, dict[str, Any]]:
    """Every stored part of every tensor, as plain lists (comparable with ==)."""
    tensors, _ = decode_artifact(blob)
    return {name: {"kind": qt.kind, **{k: t.tolist() for k, t in qt.parts.items()}} for name, qt in tensors.items()}

"""Train one micro model and export it under different technique sets (export-stage tests share it)."""

from __future__ import annotations

from typing import Any

from pgolf.artifact import decode_artifact
from pgolf.lifecycle import ExportOutcome, Session, TrainOutcome
from pgolf.recipe import Recipe, load_recipe
from pgolf.reporter import Reporter
from tests.conftest import MICRO, REPO

QUIET = Reporter(quiet=True)


def train_micro() -> TrainOutcome:
    session = Session(load_recipe(REPO / "recipes" / "baseline.yaml", MICRO, scale="tiny"), reporter=QUIET)
    session.load_data()
    return session.train()


def export_with(recipe: Recipe, trained: TrainOutcome) -> tuple[Session, ExportOutcome]:
    """Export the already trained model under `recipe`'s techniques, as an ablation reusing a checkpoint."""
    session = Session(recipe, reporter=QUIET)
    session.load_data()
    return session, session.export(trained.model, trained.info)


def stored_tensors(blob: bytes) -> dict[str, dict[str, Any]]:
    """Every stored part of every tensor, as plain lists (comparable with ==)."""
    tensors, _ = decode_artifact(blob)
    return {name: {"kind": qt.kind, **{k: t.tolist() for k, t in qt.parts.items()}} for name, qt in tensors.items()}

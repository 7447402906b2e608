"""Planning: every (arm, seed) run resolved and its three stage keys computed; nothing is trained."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgolf.config import build_dataclass
from pgolf.data.dataset import load_dataset
from pgolf.errors import PgolfError
from pgolf.host import Session, attach_data, text_transform, train_reserve_seconds
from pgolf.recipe import load_recipe, recipe_from_dict
from pgolf.registry import Enabled, check_declared_stages, load_technique_class, technique_problems
from pgolf.reporter import Reporter
from pgolf.runtime import device_kind
from pgolf.study.cache import StageKeys, stage_key_material, stage_keys
from pgolf.study.designs import Arm, design_arms
from pgolf.study.spec import AblationSpec


@dataclass
class PlannedRun:
    arm: Arm
    seed: int
    recipe: dict[str, Any]  # as written for this arm and seed (techniques configure it in each job)
    keys: StageKeys | None = None
    material: dict[str, Any] | None = None
    error: str | None = None  # the arm cannot be built (conflict, missing requirement)

    @property
    def label(self) -> str:
        return f"{self.arm.id} seed {self.seed}"

    @property
    def record_name(self) -> str:
        return f"{self.arm.slug}-seed{self.seed}.json"


@dataclass
class Plan:
    spec: AblationSpec
    toggles: list[str]
    names: dict[str, str]  # toggle key -> technique name, for labels
    in_recipe: list[str]
    arms: list[Arm]
    baseline: Arm
    runs: list[PlannedRun]
    device_kind: str
    notes: list[str] = field(default_factory=list)


def plan_ablation(spec: AblationSpec, device: str | None = None) -> Plan:
    """Resolve the recipe per arm and seed, and key every run's stages (nothing is trained here).
    `device`: the kind of device the jobs run on, when not this machine's (a Ray cluster's)."""
    recipe_path = Path(spec.recipe)
    overrides = spec.overrides()
    plain = load_recipe(recipe_path, overrides, scale=spec.scale, technique_check=technique_problems)
    full = load_recipe(recipe_path, overrides, scale=spec.scale, enable=spec.toggle, technique_check=technique_problems)
    names = {t: load_technique_class(t, full.provenance).name or t for t in spec.toggle}
    toggled = [Enabled(t, cls := load_technique_class(t, full.provenance),
                       cls(build_dataclass(cls.Config, full.techniques.get(t) or {}, f"techniques.{t}", full.provenance)))
               for t in spec.toggle]
    check_declared_stages(toggled, full.provenance)  # a misdeclared toggle would make every cached reuse wrong
    in_recipe = [t for t in spec.toggle if t in plain.techniques]
    notes = [f"'{t}' is not in {recipe_path.name}; toggled on with its default parameters"
             for t in spec.toggle if t not in in_recipe]
    baseline_on = tuple(in_recipe) if spec.baseline == "recipe" else ()
    arms = design_arms(spec.toggle, spec.design, baseline_on)
    kind = device or device_kind()
    base = full.to_dict()
    quiet = Reporter(quiet=True)
    datasets: dict[tuple, Any] = {}
    runs: list[PlannedRun] = []
    failures: list[PgolfError] = []
    for arm in arms:
        for seed in spec.seeds:
            data = copy.deepcopy(base)
            data["techniques"] = {k: v for k, v in base["techniques"].items() if k not in spec.toggle or k in arm.on}
            data["seed"] = seed
            run = PlannedRun(arm, seed, data)
            runs.append(run)
            try:
                session = Session(recipe_from_dict(data, full.provenance, default_name=full.name), reporter=quiet)
            except PgolfError as exc:
                run.error = exc.render()
                failures.append(exc)
                continue
            r = session.recipe
            transform = text_transform(session)
            signature = (r.data.dir, r.data.tokenizer, r.model.vocab_size, r.data.train_shards,
                         getattr(transform, "name", type(transform).__qualname__ if transform else None))
            if signature not in datasets:
                ds = load_dataset(r.data.dir, r.data.tokenizer, r.model.vocab_size, transform, r.data.train_shards)
                datasets[signature] = (ds, ds.fingerprint)
            dataset, fingerprint = datasets[signature]
            attach_data(session, dataset)
            reserve = train_reserve_seconds(session) if r.train.max_wallclock_seconds else 0.0
            run.material = stage_key_material(session, fingerprint, kind, reserve)
            run.keys = stage_keys(run.material)
    if failures and all(run.error for run in runs):
        raise failures[0]
    baseline = arms[0]
    return Plan(spec, list(spec.toggle), names, in_recipe, arms, baseline, runs, kind, notes)

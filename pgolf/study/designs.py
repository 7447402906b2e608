"""The arms an experimental design runs: every subset, one toggle at a time, or leave one out."""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

from pgolf.study.spec import Design


@dataclass(frozen=True)
class Arm:
    """One combination of the toggles: those listed in `on` are enabled, the others removed."""

    on: tuple[str, ...]

    def label(self, names: dict[str, str]) -> str:
        return " + ".join(names.get(t, t) for t in self.on) or "(none)"

    @property
    def id(self) -> str:
        return "+".join(self.on) or "none"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.id)


def design_arms(toggles: list[str], design: Design, baseline_on: tuple[str, ...]) -> list[Arm]:
    """The arms a design runs, baseline first.

    factorial: every subset, by size. one-at-a-time: the baseline and each toggle flipped from
    it, in toggle order. leave-one-out: everything on, then everything on but each toggle in
    turn (plus the baseline arm).
    """
    def arm(on: set[str]) -> Arm:
        return Arm(tuple(t for t in toggles if t in on))

    baseline = arm(set(baseline_on))
    if design == "factorial":
        arms = [arm(set(c)) for r in range(len(toggles) + 1) for c in combinations(toggles, r)]
    elif design == "one-at-a-time":
        arms = [arm(set(baseline.on) ^ {t}) for t in toggles]
    else:
        arms = [arm(set(toggles))] + [arm(set(toggles) - {t}) for t in toggles]
    return [baseline] + [a for a in dict.fromkeys(arms) if a != baseline]

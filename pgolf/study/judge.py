"""Judging a submission with the tests people actually printed (../shared/reference/frontier.md §2.2).

`judge` pools each arm's sources (a record and its reproductions), runs one method — per-seed
Welch, Welch from submission.json's mean/std/n (which reproduces the May-2 rows and inherits a
population SD's downward bias, so it says when a std is one), seed-matched pairs, or a one-sample
test against a fixed score, each one- or two-sided — and reports both verdicts. Each result
carries the exact scipy call that made it. Only numpy and scipy are imported (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pgolf.errors import PgolfError
from pgolf.study.stats import (
    POWER,
    POWER_ALPHA,
    PRACTICE_ALPHA,
    RULE_ALPHA,
    RULE_MARGIN_NATS,
    Summary,
    TTest,
    bpb_to_nats,
    json_safe,
    nats_to_bpb,
    one_sample,
    paired,
    pool_summaries,
    printed_precision,
    sample_std,
    seeds_needed,
    std_ddof,
    welch,
    welch_from_summary,
)

METHODS = {
    "welch": "Welch t-test of the per-seed scores (ddof=1)",
    "summary": "Welch t-test from each arm's mean, std and n (as the May-2 leaderboard rows were computed)",
    "paired": "t-test of seed-matched differences",
    "one-sample": "t-test of the new seeds against a fixed score",
}
ALTERNATIVES = ("less", "two-sided")


@dataclass
class Source:
    """Scores from one place: a typed list, or one block of a submission.json."""

    label: str
    scores: list[float] = field(default_factory=list)
    seeds: list[int] | None = None  # the seed of each score; None when the source does not name them
    reported: Summary | None = None  # mean, std and n as the file states them
    tokens_per_byte: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ArmFigures:
    """The figures a test used for one arm (its sources pooled)."""

    sources: list[str]
    n: int
    mean: float
    std: float
    scores: list[float]


@dataclass
class Judgement:
    """A new arm against an old one (or a threshold) by one method, with both verdicts."""

    method: str
    description: str
    alternative: str
    new: ArmFigures
    old: ArmFigures | None
    threshold: float | None
    delta: float  # new - old (or - threshold) in bpb; negative = the new arm is better
    delta_nats: float | None
    test: TTest
    per_seed: TTest | None  # --method summary: the per-seed Welch test beside it, when the seeds are known
    tokens_per_byte: float | None
    tokens_per_byte_from: str | None
    margin_nats: float
    margin_bpb: float | None
    test_margin: TTest | None
    seeds_needed: int | None
    verdicts: dict[str, bool | None]
    notes: list[str]
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def text(self) -> list[str]:
        """The report `pgolf stats` prints."""
        hypothesis = "one-sided test (H1: new lower)" if self.alternative == "less" else "two-sided test (H1: they differ)"
        lines = [f"method: {self.method}: {self.description}"]
        for name, arm in (("new", self.new), ("old", self.old)):
            if arm is not None:
                lines.append(f"{name}: n={arm.n} mean={arm.mean:.8f} std={arm.std:.8f}  ({'; '.join(arm.sources)})")
        against = "old" if self.old is not None else f"threshold {self.threshold}"
        nats = f" ({self.delta_nats:+.6f} nats)" if self.delta_nats is not None else ""
        lines.append(f"delta (new - {against}): {self.delta:+.8f} bpb, 95% CI [{self.test.ci_low:+.8f}, "
                     f"{self.test.ci_high:+.8f}]{nats}")
        lines.append(f"{hypothesis}: t = {self.test.t:.4f}, df = {self.test.df:.3f}, "
                     f"p = {self.test.p_value:.4g}")
        lines.append(f"  = {self.test.call}")
        if self.per_seed is not None:
            lines.append(f"per-seed Welch beside it: p = {self.per_seed.p_value:.4g}, t = {self.per_seed.t:.4f}, "
                         f"df = {self.per_seed.df:.3f}")
            lines.append(f"  = {self.per_seed.call}")
        if self.test_margin is not None:
            lines.append(f"with the {self.margin_nats}-nat margin ({self.margin_bpb:.6f} bpb at "
                         f"{self.tokens_per_byte:.5f} tokens/byte from {self.tokens_per_byte_from}): "
                         f"t = {self.test_margin.t:.4f}, df = {self.test_margin.df:.3f}, p = {self.test_margin.p_value:.4g}")
            lines.append(f"  = {self.test_margin.call}")
        verdict = {True: "PASS", False: "FAIL", None: "not tested (pass --tokens-per-byte)"}
        lines.append(f"leaderboard practice (p < {PRACTICE_ALPHA}, no margin, against the previous frontier row): "
                     f"{verdict[self.verdicts['practice']]}")
        lines.append(f"written rule (p < {RULE_ALPHA}, {self.margin_nats}-nat margin): {verdict[self.verdicts['rule']]}")
        per = "per arm " if self.old is not None and self.method != "paired" else ""
        needed = "not applicable (new is not lower)" if self.seeds_needed is None else str(self.seeds_needed)
        lines.append(f"seeds {per}to detect this delta at this sigma (power {POWER}, alpha {POWER_ALPHA}): {needed}")
        lines += [f"note: {n}" for n in self.notes] + [f"warning: {w}" for w in self.warnings]
        return lines


@dataclass
class _Design:
    """What one method needs from the arms: their figures and the test as a function of the margin."""

    new: ArmFigures
    old: ArmFigures | None
    delta: float
    run: Callable[[float], TTest]
    sigma: float
    samples: int
    per_seed: TTest | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def judge(new: Sequence[Source], old: Sequence[Source] = (), *, method: str = "welch", alternative: str = "less",
          threshold: float | None = None, tokens_per_byte: float | None = None,
          margin_nats: float = RULE_MARGIN_NATS) -> Judgement:
    """Test a new arm against an old one, each pooled from its sources, by one of METHODS.

    Verdicts: `practice` is p < 0.25 with no margin, `rule` p < 0.01 after the margin in nats
    (converted to bpb with the given tokens per byte, else the sources' own). A two-sided test
    passes only when the new arm is also the lower one.
    """
    if method not in METHODS:
        raise PgolfError(f"unknown --method '{method}'", hint=f"Choose one of: {', '.join(METHODS)}.")
    if alternative not in ALTERNATIVES:
        raise PgolfError(f"unknown alternative '{alternative}'", hint=f"Choose one of: {', '.join(ALTERNATIVES)}.")
    if method == "one-sample":
        if threshold is None:
            raise PgolfError("--method one-sample needs --threshold, the fixed score the new seeds are tested against",
                             hint="For example the record's val_bpb: --threshold 1.0810.")
        if old:
            raise PgolfError("--method one-sample tests --new against --threshold; --old is not used",
                             hint="Drop --old, or use --method welch to compare two arms.")
        design = _one_sample_design(new, threshold, alternative)
    else:
        if threshold is not None:
            raise PgolfError(f"--threshold applies only to --method one-sample, not --method {method}",
                             hint="Drop --threshold, or add --method one-sample.")
        if not old:
            raise PgolfError(f"--method {method} compares two arms and needs --old",
                             hint="Give the record's per-seed scores, its submission.json or its records folder.")
        design = {"welch": _welch_design, "summary": _summary_design, "paired": _paired_design}[method](
            new, old, alternative)
    warnings_ = list(design.warnings)
    tpb, tpb_from = _tokens_per_byte(tokens_per_byte, [*new, *old], warnings_)
    margin_bpb = nats_to_bpb(margin_nats, tpb) if tpb else None
    test = design.run(0.0)
    test_margin = design.run(margin_bpb) if margin_bpb is not None else None
    notes = [n for source in [*new, *old] for n in source.notes] + design.notes
    return Judgement(
        method=method, description=METHODS[method], alternative=alternative, new=design.new, old=design.old,
        threshold=threshold, delta=design.delta, delta_nats=bpb_to_nats(design.delta, tpb) if tpb else None,
        test=test, per_seed=design.per_seed, tokens_per_byte=tpb, tokens_per_byte_from=tpb_from,
        margin_nats=margin_nats, margin_bpb=margin_bpb, test_margin=test_margin,
        seeds_needed=seeds_needed(design.delta, design.sigma, samples=design.samples),
        verdicts={"practice": _passes(test, PRACTICE_ALPHA), "rule": _passes(test_margin, RULE_ALPHA)},
        notes=notes, warnings=warnings_)


def _passes(test: TTest | None, alpha: float) -> bool | None:
    """p below alpha with the new arm on the lower side (what a one-sided p < 0.5 already implies)."""
    if test is None:
        return None
    return bool(math.isfinite(test.p_value) and test.p_value < alpha and test.t < 0)


def _pooled(sources: Sequence[Source], flag: str, test_name: str) -> list[float]:
    """Every per-seed score of an arm's sources, in order; at least two."""
    for source in sources:
        if not source.scores:
            raise PgolfError(f"{flag} {source.label}: no per-seed scores, only a reported mean and std",
                             hint="Use --method summary to test from those fields, or give the per-seed val_bpb values.")
    scores = [x for source in sources for x in source.scores]
    if len(scores) < 2:
        raise PgolfError(f"a {test_name} needs at least two scores in {flag}, got {len(scores)} "
                         f"(from {', '.join(s.label for s in sources)})", hint="Give one val_bpb per seed.")
    return scores


def _figures(sources: Sequence[Source], scores: Sequence[float]) -> ArmFigures:
    return ArmFigures([s.label for s in sources], len(scores), float(np.mean(scores)), sample_std(scores),
                      list(scores))


def _welch_design(new: Sequence[Source], old: Sequence[Source], alternative: str) -> _Design:
    a, b = _pooled(new, "--new", "Welch test"), _pooled(old, "--old", "Welch test")
    return _Design(_figures(new, a), _figures(old, b), float(np.mean(a) - np.mean(b)),
                   lambda margin: welch(a, b, alternative=alternative, margin=margin),
                   math.sqrt((sample_std(a) ** 2 + sample_std(b) ** 2) / 2), samples=2)


def _arm_summary(sources: Sequence[Source], flag: str) -> tuple[Summary, list[str]]:
    """An arm's summary for the from-stats test, and warnings on reported figures its seeds contradict."""
    parts, warnings_ = [], []
    for source in sources:
        reported = source.reported
        if reported is None:
            if len(source.scores) < 2:
                raise PgolfError(f"{flag} {source.label}: neither a reported mean and std nor two per-seed scores",
                                 hint="--method summary needs val_bpb with val_bpb_std (or std_bpb), or the seeds.")
            parts.append(Summary.of(source.scores))
            continue
        parts.append(reported)
        if std_ddof(reported.std, source.scores) == 0:
            warnings_.append(
                f"{source.label}: its std {reported.std} is the population SD of its {len(source.scores)} seeds "
                f"({float(np.std(source.scores)):.8f}, ddof=0), not the sample SD scipy assumes "
                f"({sample_std(source.scores):.8f}, ddof=1): the test from it understates the spread and biases p down")
        if source.scores and abs(reported.mean - float(np.mean(source.scores))) > printed_precision(reported.mean):
            warnings_.append(f"{source.label}: its mean {reported.mean} is not the mean of its seeds "
                             f"({float(np.mean(source.scores)):.8f})")
    summary = pool_summaries(parts)
    if summary.n < 2 or not math.isfinite(summary.std):
        raise PgolfError(f"a test from summaries needs at least two seeds in {flag}, got {summary.n}",
                         hint="Give a submission with val_bpb, val_bpb_std and its seeds, or the per-seed scores.")
    return summary, warnings_


def _summary_design(new: Sequence[Source], old: Sequence[Source], alternative: str) -> _Design:
    (sn, warn_new), (so, warn_old) = _arm_summary(new, "--new"), _arm_summary(old, "--old")
    notes = []
    for flag, sources in (("--new", new), ("--old", old)):
        computed = [s.label for s in sources if s.reported is None]
        if computed:
            notes.append(f"{flag} {', '.join(computed)}: no reported std; mean and sample SD computed from the seeds")
        if len(sources) > 1:
            notes.append(f"{flag}: {len(sources)} summaries pooled into one arm (each std taken as a sample SD)")
    a = [x for s in new for x in s.scores]
    b = [x for s in old for x in s.scores]
    all_seeds = all(s.scores for s in [*new, *old]) and len(a) > 1 and len(b) > 1
    per_seed = welch(a, b, alternative=alternative) if all_seeds else None
    return _Design(ArmFigures([s.label for s in new], sn.n, sn.mean, sn.std, a),
                   ArmFigures([s.label for s in old], so.n, so.mean, so.std, b), sn.mean - so.mean,
                   lambda margin: welch_from_summary(sn, so, alternative=alternative, margin=margin),
                   math.sqrt((sn.std**2 + so.std**2) / 2), samples=2, per_seed=per_seed, notes=notes,
                   warnings=warn_new + warn_old)


def _by_seed(sources: Sequence[Source], flag: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for source in sources:
        for seed, score in zip(source.seeds or [], source.scores, strict=True):
            if seed in out:
                raise PgolfError(f"seed {seed} appears twice in {flag} ({source.label} and an earlier source)",
                                 hint="A pooled arm cannot be paired by seed; use --method welch.")
            out[seed] = score
    return out


def _paired_design(new: Sequence[Source], old: Sequence[Source], alternative: str) -> _Design:
    a, b = _pooled(new, "--new", "paired t-test"), _pooled(old, "--old", "paired t-test")
    if all(s.seeds is not None for s in [*new, *old]):
        new_map, old_map = _by_seed(new, "--new"), _by_seed(old, "--old")
        if set(new_map) != set(old_map):
            raise PgolfError(f"--method paired needs the same seeds in both arms: only in --new "
                             f"{sorted(set(new_map) - set(old_map))}, only in --old {sorted(set(old_map) - set(new_map))}",
                             hint="Give both arms' results for the same seeds, or use --method welch.")
        seeds = sorted(new_map)
        a, b = [new_map[s] for s in seeds], [old_map[s] for s in seeds]
        how = f"paired by seed ({', '.join(map(str, seeds))})"
    elif len(a) != len(b):
        raise PgolfError(f"--method paired pairs the scores in the order given when seeds are not named, and needs "
                         f"as many in --new ({len(a)}) as in --old ({len(b)})",
                         hint="Write them as seed:score (42:1.0801,314:1.0795), or use --method welch.")
    else:
        how = "paired in the order given (no seed named)"
    diffs = np.subtract(a, b)
    return _Design(_figures(new, a), _figures(old, b), float(np.mean(diffs)),
                   lambda margin: paired(a, b, alternative=alternative, margin=margin),
                   sample_std(diffs), samples=1, notes=[how])


def _one_sample_design(new: Sequence[Source], threshold: float, alternative: str) -> _Design:
    a = _pooled(new, "--new", "one-sample t-test")
    return _Design(_figures(new, a), None, float(np.mean(a)) - threshold,
                   lambda margin: one_sample(a, threshold, alternative=alternative, margin=margin),
                   sample_std(a), samples=1)


def _tokens_per_byte(given: float | None, sources: Sequence[Source], warnings_: list[str]) -> tuple[float | None, str | None]:
    """The flag's value, else the mean of the sources' own (val_bpb * ln 2 / val_loss)."""
    if given is not None:
        return given, "--tokens-per-byte"
    found = [(s.label, s.tokens_per_byte) for s in sources if s.tokens_per_byte]
    if not found:
        return None, None
    values = [v for _, v in found]
    if max(values) > min(values) * 1.005:
        warnings_.append("the sources' tokens per byte differ (" + ", ".join(f"{label}: {v:.5f}" for label, v in found)
                         + "): they were not scored with one tokenizer, so a margin in nats is a different bpb margin "
                           "for each; their mean is used")
    return float(np.mean(values)), "val_bpb * ln 2 / val_loss of " + ", ".join(label for label, _ in found)



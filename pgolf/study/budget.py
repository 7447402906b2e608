"""What a study will cost before it spends anything, and when its remaining seeds can no longer matter.

Projection. Every stage output a plan needs is either in the (verified) cache, costing nothing,
failed before (skipped unless retried), or a job to run. A job's device seconds come from, best
first:

- measured: the same job but for its seed (the stage key material without the seed) finished
  before in this ablation directory. The scheduler records each job's wall time in
  `job_seconds.json`; outputs made without that record fall back to the stage timings stored with
  them (train.json: warmup + training + averaging; export.json: calibration + quantization;
  manifest.json: data loading + the eval stage), which leave out process start and, for training,
  the pre-quantization score. The slowest matching measurement is used.
- cap: what the recipe's caps allow. Training stops at `train.max_wallclock_seconds` less the
  calibration reserve, which the export job then spends (so the two jobs together are charged the
  cap); evaluation at most `eval.max_seconds` (the time audit fails a slower run). Warmup and
  compilation, the pre-quantization score, quantizing and the audits are not capped and come on top.
- unknown: nothing bounds it (step-matched training, `--steps N`, has no cap) and nothing measured
  it. A study with unknown jobs has no projected cost, so `--max-usd` refuses it.

Device time becomes money as seconds x GPUs per job / 3600 x the price of a GPU-hour.

Stopping when decided. A variant's verdict (the table's practice column, Welch p < 0.25, and its
rule column, p < 0.01 after the 0.005-nat margin) is decided when no outcome of the seeds still
to come can change it. Each unfinished seed of an arm may return any value in the arm's observed
range widened by `PLAUSIBLE_STDS` standard deviations (the larger of the arm's own and the pooled
within-arm deviation), or fail and return nothing. For every count of them that may finish, the
Welch p-value is bounded over that whole box: the mean difference by its extremes, each arm's
variance between its exact minimum (the new values at the observed mean) and its exact maximum
(the new values at the box's ends: the variance is convex, so a corner holds it), the Welch
degrees of freedom between min(n) - 1 and n_new + n_old - 2, and p from the t distribution's CDF at
the resulting extremes of t. Every bound is conservative, so a verdict called decided is the
verdict for any such outcome. Each arm needs two finished seeds before it can be decided; the
runs' tokens per byte (which set the margin) do not depend on the seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from pgolf.errors import ConfigError
from pgolf.products import EXPORT_INFO_FILE, MANIFEST_FILE, TRAIN_INFO_FILE
from pgolf.registry import STAGES, Stage
from pgolf.study import stats
from pgolf.study.cache import CorruptCacheEntry, StageCache, canonical_hash
from pgolf.study.plan import Plan, PlannedRun

JOB_SECONDS_FILE = "job_seconds.json"  # in the ablation directory: each finished job's wall time
JOB_SECONDS_FORMAT = "pgolf-job-seconds/1"
PLAUSIBLE_STDS = 4.0

OutputState = Literal["cached", "run", "failed"]


@dataclass
class StageOutput:
    """One stage output a plan needs, what it will cost, and the runs that need it."""

    stage: Stage
    key: str
    runs: list[PlannedRun]
    state: OutputState
    after: tuple[Stage, str] | None = None  # the job it waits for (outputs still to make)
    error: str | None = None  # the stored failure ("failed")
    seconds: float | None = None  # projected device seconds of its job (0 when cached or failed)
    source: str = ""

    @property
    def id(self) -> tuple[Stage, str]:
        return self.stage, self.key


def survey(runs: Sequence[PlannedRun], cache: StageCache, retry_failed: bool) -> list[StageOutput]:
    """The stage outputs the runs need, in the order they are met; reads the cache, changes nothing
    in it (a damaged entry is reported and moved aside, as every reader does)."""
    outputs: dict[tuple[Stage, str], StageOutput] = {}

    def need(stage: Stage, key: str, run: PlannedRun, state: OutputState, **extra: Any) -> StageOutput:
        output = outputs.get((stage, key))
        if output is None:
            output = outputs[(stage, key)] = StageOutput(stage, key, [], state, **extra)
        output.runs.append(run)
        return output

    for run in runs:
        if run.keys is None:
            continue
        if cache.done("eval", run.keys.eval):  # its earlier stages are not needed
            need("eval", run.keys.eval, run, "cached")
            continue
        previous: tuple[Stage, str] | None = None
        for stage in STAGES:  # a later stage still waits on a redone earlier one
            key = run.keys.of(stage)
            if (stage, key) in outputs:
                output = need(stage, key, run, outputs[(stage, key)].state)
            elif cache.done(stage, key):
                output = need(stage, key, run, "cached")
            else:
                stored = cache.error(stage, key)
                if stored is not None and not retry_failed:
                    output = need(stage, key, run, "failed", error=stored["error"])
                else:
                    output = need(stage, key, run, "run", after=previous)
            if output.state == "failed":
                break
            if output.state == "run":
                previous = output.id
    return list(outputs.values())


def seed_major(plan: Plan) -> list[PlannedRun]:
    """Every arm's first seed, then every arm's second...: the order that lets a study stop early."""
    return sorted(plan.runs, key=lambda run: plan.spec.seeds.index(run.seed))


# --- measurements ------------------------------------------------------------------------------------


def cost_signatures(material: Mapping[Stage, Mapping[str, Any]]) -> dict[Stage, str]:
    """A run's stage keys without its seed: equal for the same job of another seed, so they share a cost."""
    train = canonical_hash({"stage": "train", **{k: v for k, v in material["train"].items() if k != "seed"}})
    export = canonical_hash({"stage": "export", "after": train, **material["export"]})
    evaluation = canonical_hash({"stage": "eval", "after": export, **material["eval"]})
    return {"train": train, "export": export, "eval": evaluation}


@dataclass(frozen=True)
class Measurement:
    seconds: float
    seed: int
    kind: str  # "job time" (recorded by the scheduler) or "stage timings" (stored with the output)


def read_job_seconds(out: Path) -> dict[Stage, dict[str, dict[str, Any]]]:
    """The job times earlier invocations recorded; a missing or damaged file counts as none."""
    empty: dict[Stage, dict[str, dict[str, Any]]] = {s: {} for s in STAGES}
    try:
        data = json.loads((Path(out) / JOB_SECONDS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return empty
    if not isinstance(data, dict) or data.get("format") != JOB_SECONDS_FORMAT:
        return empty
    for stage in STAGES:
        entries = data.get(stage)
        if isinstance(entries, dict):
            empty[stage] = {k: v for k, v in entries.items() if isinstance(v, dict)
                            and isinstance(v.get("seconds"), (int, float)) and isinstance(v.get("signature"), str)
                            and isinstance(v.get("seed"), int)}
    return empty


def job_seconds_payload(recorded: Mapping[Stage, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    return {"format": JOB_SECONDS_FORMAT, **{stage: dict(recorded[stage]) for stage in STAGES}}


def stored_stage_seconds(cache: StageCache, stage: Stage, key: str) -> float | None:
    """The stage timings a cached output carries (see the module docstring), or None."""
    if not cache.entry(stage, key).is_dir():
        return None
    try:
        if stage == "train":
            info = cache.read_json(stage, key, TRAIN_INFO_FILE)["info"]
            parts = [info["warmup_seconds"], info["train_seconds"], info.get("averaging_seconds", 0.0)]
        elif stage == "export":
            info = cache.read_json(stage, key, EXPORT_INFO_FILE)["info"]
            parts = [info["calibration_seconds"], info["quantize_seconds"]]
        else:
            seconds = cache.read_json(stage, key, MANIFEST_FILE)["stage_seconds"]
            parts = [seconds.get("data", 0.0), seconds["eval"]]
        return float(sum(parts))
    except (CorruptCacheEntry, FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def measurements(plan: Plan, cache: StageCache, job_seconds: Mapping[Stage, Mapping[str, Mapping[str, Any]]]
                 ) -> dict[tuple[Stage, str], list[Measurement]]:
    """Measured seconds by (stage, cost signature): recorded job times, else this plan's cached outputs' timings."""
    found: dict[tuple[Stage, str], list[Measurement]] = {}
    for stage in STAGES:
        for entry in job_seconds[stage].values():
            found.setdefault((stage, entry["signature"]), []).append(
                Measurement(float(entry["seconds"]), entry["seed"], "job time"))
    seen: set[tuple[Stage, str]] = set()
    for run in plan.runs:
        if run.keys is None or run.material is None:
            continue
        signatures = cost_signatures(run.material)
        for stage in STAGES:
            key = run.keys.of(stage)
            if key in job_seconds[stage] or (stage, key) in seen:
                continue
            seen.add((stage, key))
            seconds = stored_stage_seconds(cache, stage, key)
            if seconds is not None:
                found.setdefault((stage, signatures[stage]), []).append(Measurement(seconds, run.seed, "stage timings"))
    return found


def capped_seconds(stage: Stage, material: Mapping[Stage, Mapping[str, Any]]) -> tuple[float | None, str]:
    """A job's seconds from the recipe's caps (as configured, after techniques), or None and why not."""
    train = material["train"]
    cap = float(train["sections"]["train"].get("max_wallclock_seconds") or 0.0)
    reserve = float(train.get("reserve_seconds") or 0.0)
    if stage == "train":
        if cap > 0:
            less = f" less the {reserve:g} s calibration reserve" if reserve else ""
            return cap - reserve, f"cap: train.max_wallclock_seconds {cap:g} s{less}"
        return None, "unknown: step-matched training has no wallclock cap, and no run of this arm was measured"
    if stage == "export":
        if cap > 0:
            return reserve, f"cap: the {reserve:g} s calibration reserve (quantizing is not capped)"
        return None, "unknown: an uncapped run's export has no cap, and no run of this arm was measured"
    limit = float(material["eval"]["sections"]["eval"].get("max_seconds") or 0.0)
    if limit > 0:
        return limit, f"cap: eval.max_seconds {limit:g} s"
    return None, "unknown: eval.max_seconds sets no limit, and no run of this arm was measured"


def _measured_source(found: list[Measurement]) -> tuple[float, str]:
    slowest = max(found, key=lambda m: m.seconds)
    seeds = sorted({m.seed for m in found})
    of = f"seed {seeds[0]}" if len(seeds) == 1 else f"the slowest of seeds {', '.join(map(str, seeds))}"
    return slowest.seconds, f"measured: {slowest.kind} of {of}"


# --- the projection ------------------------------------------------------------------------------------


@dataclass
class Projection:
    """The outputs a study needs, each with its projected seconds, and their cost."""

    outputs: list[StageOutput]
    gpus_per_job: int = 1
    gpu_hour_usd: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def to_run(self) -> list[StageOutput]:
        return [o for o in self.outputs if o.state == "run"]

    @property
    def unknown(self) -> list[StageOutput]:
        return [o for o in self.to_run if o.seconds is None]

    @property
    def seconds(self) -> float:
        """Device seconds of the jobs to run whose time is projected (see `unknown` for the rest)."""
        return float(sum(o.seconds for o in self.to_run if o.seconds is not None))

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus_per_job / 3600.0

    @property
    def usd(self) -> float | None:
        return None if self.gpu_hour_usd is None else self.gpu_hours * self.gpu_hour_usd

    def count(self, state: OutputState) -> dict[Stage, int]:
        return {s: sum(1 for o in self.outputs if o.state == state and o.stage == s) for s in STAGES}

    def headline(self) -> str:
        """One line: the jobs to run and what they cost."""
        jobs = ", ".join(f"{n} {s}" for s, n in self.count("run").items())
        cached = sum(self.count("cached").values())
        text = f"to run: {jobs} job(s); {cached} output(s) cached; device time {_duration(self.seconds)}"
        if self.unknown:
            text += f" + {len(self.unknown)} job(s) of unknown time"
        text += f" x {self.gpus_per_job} GPU(s) per job = {self.gpu_hours:.3f} GPU-hours"
        if self.usd is not None:
            text += f" = {'at least ' if self.unknown else ''}${self.usd:,.2f} at ${self.gpu_hour_usd:g}/GPU-hour"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "outputs": [{"stage": o.stage, "key": o.key, "state": o.state, "seconds": o.seconds, "source": o.source,
                         "runs": [r.label for r in o.runs], **({"error": o.error} if o.error else {})}
                        for o in self.outputs],
            "to_run": self.count("run"), "cached": self.count("cached"), "failed": self.count("failed"),
            "seconds": self.seconds, "unknown_jobs": len(self.unknown), "gpus_per_job": self.gpus_per_job,
            "gpu_hours": self.gpu_hours, "gpu_hour_usd": self.gpu_hour_usd, "usd": self.usd,
            "complete": not self.unknown, "notes": self.notes,
        }


def project(plan: Plan, cache: StageCache, out: Path, *, retry_failed: bool = False, gpus_per_job: int = 1,
            gpu_hour_usd: float | None = None, runs: Sequence[PlannedRun] | None = None) -> Projection:
    """Survey the cache and give every job its projected seconds and their source (see the module docstring)."""
    outputs = survey(runs if runs is not None else plan.runs, cache, retry_failed)
    found = measurements(plan, cache, read_job_seconds(out))
    for output in outputs:
        if output.state == "cached":
            output.seconds, output.source = 0.0, "cached (verified)"
            continue
        if output.state == "failed":
            output.seconds, output.source = 0.0, "failed before: not run without --retry-failed"
            continue
        material = output.runs[0].material
        assert material is not None  # every run with keys has its key material
        measured = found.get((output.stage, cost_signatures(material)[output.stage]))
        output.seconds, output.source = (_measured_source(measured) if measured
                                         else capped_seconds(output.stage, material))
    notes = []
    if any(o.source.startswith("cap:") for o in outputs):
        notes.append("cap figures count the capped phases only: warmup and compilation, the pre-quantization "
                     "score, quantizing and the audits come on top")
    if plan.spec.stop_when_decided:
        notes.append("an upper bound: --stop-when-decided skips the seeds left once every verdict is decided")
    return Projection(outputs, gpus_per_job, gpu_hour_usd, notes)


class OverBudget(ConfigError):
    """The projected cost of a study is over --max-usd, or cannot be projected."""


def check_budget(projection: Projection, max_usd: float | None) -> None:
    """Refuse a study over `max_usd`, or one whose cost is unknown while a limit is set."""
    if max_usd is None:
        return
    if projection.gpu_hour_usd is None:
        raise OverBudget("--max-usd needs a price to compare against", key="max_usd",
                         hint="Pass --gpu-hour-usd (the price of one GPU-hour) with it.")
    if projection.unknown:
        kinds = ", ".join(f"{n} {s}" for s, n in _by_stage(projection.unknown).items() if n)
        raise OverBudget(
            f"cannot hold the study to --max-usd {max_usd:g}: {kinds} job(s) have no projected time "
            f"({projection.unknown[0].source.removeprefix('unknown: ')}); the jobs with known times come to "
            f"${projection.usd:,.2f}", key="max_usd",
            hint="Run one seed first to measure the jobs (the next --plan uses its times), or drop --max-usd to "
                 "run without a limit.")
    assert projection.usd is not None
    if projection.usd > max_usd:
        raise OverBudget(
            f"the study is projected to cost ${projection.usd:,.2f} ({len(projection.to_run)} job(s), "
            f"{_duration(projection.seconds)} of device time x {projection.gpus_per_job} GPU(s) per job at "
            f"${projection.gpu_hour_usd:g}/GPU-hour), over --max-usd {max_usd:g}; nothing was run", key="max_usd",
            hint="Run fewer seeds or arms, or raise --max-usd; --plan lists every job with its projected time "
                 "and where that figure came from.")


def _by_stage(outputs: list[StageOutput]) -> dict[Stage, int]:
    return {s: sum(1 for o in outputs if o.stage == s) for s in STAGES}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds:,.0f} s ({seconds / 3600:.2f} h)"


def render_projection(projection: Projection, plan: Plan, out: Path) -> str:
    """The --plan listing: every output with its state, seconds and source, then the totals."""
    spec = plan.spec
    lines = [f"plan: {Path(spec.recipe).name}, {spec.design}, {len(plan.arms)} arm(s) x {len(spec.seeds)} seed(s) "
             f"= {len(plan.runs)} runs, in {out}"]
    for note in plan.notes:
        lines.append(f"note: {note}")
    for run in plan.runs:
        if run.error is not None:
            lines.append(f"cannot run {run.label}: {run.error}")
    rows = [("stage", "key", "state", "seconds", "source", "needed by")]
    for o in projection.outputs:
        seconds = "unknown" if o.seconds is None else f"{o.seconds:.1f}"
        rows.append((o.stage, o.key[:12], {"run": "to run"}.get(o.state, o.state), seconds,
                     o.source + (f" ({o.error.splitlines()[0]})" if o.error else ""),
                     ", ".join(r.label for r in o.runs)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
              for row in rows]
    lines.append(projection.headline())
    lines += [f"note: {note}" for note in projection.notes]
    return "\n".join(lines) + "\n"


# --- stopping when decided ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmScores:
    """An arm's finished per-seed val_bpb, how many of its seeds may still finish, and its tokens per byte."""

    values: tuple[float, ...]
    remaining: int = 0
    tokens_per_byte: float | None = None


def plausible_box(arm: ArmScores, spread: float, stds: float = PLAUSIBLE_STDS) -> tuple[float, float]:
    """Where an unfinished seed of the arm may land: the observed range widened by `stds` deviations."""
    return min(arm.values) - stds * spread, max(arm.values) + stds * spread


def _moment_bounds(values: np.ndarray, added: int, box: tuple[float, float]) -> tuple[int, float, float, float, float]:
    """n, the mean's bounds and the sample variance's exact bounds over `added` new values in `box`."""
    lo, hi = box
    n = values.size + added
    total = float(values.sum())
    ss = float(np.sum((values - values.mean()) ** 2))
    var_hi = max(float(np.var(np.concatenate([values, [hi] * j, [lo] * (added - j)]), ddof=1))
                 for j in range(added + 1))
    return n, (total + added * lo) / n, (total + added * hi) / n, ss / (n - 1), var_hi


def _p_bounds(new: tuple[np.ndarray, int, tuple[float, float]], old: tuple[np.ndarray, int, tuple[float, float]],
              margin: float) -> tuple[float, float] | None:
    """Bounds of the one-sided Welch p (H1: new + margin < old) over the new values; None if unbounded."""
    (x_new, add_new, box_new), (x_old, add_old, box_old) = new, old
    if add_new == 0 and add_old == 0:  # the finished seeds alone: the exact p
        p = stats.welch(x_new, x_old, margin=margin).p_value
        return (p, p) if math.isfinite(p) else None
    n_new, mean_new_lo, mean_new_hi, var_new_lo, var_new_hi = _moment_bounds(x_new, add_new, box_new)
    n_old, mean_old_lo, mean_old_hi, var_old_lo, var_old_hi = _moment_bounds(x_old, add_old, box_old)
    d_lo, d_hi = mean_new_lo + margin - mean_old_hi, mean_new_hi + margin - mean_old_lo
    se_lo = math.sqrt(var_new_lo / n_new + var_old_lo / n_old)
    se_hi = math.sqrt(var_new_hi / n_new + var_old_hi / n_old)
    if se_lo <= 0:
        return None
    t_lo = d_lo / se_lo if d_lo < 0 else d_lo / se_hi
    t_hi = d_hi / se_hi if d_hi < 0 else d_hi / se_lo
    dfs = (min(n_new, n_old) - 1, n_new + n_old - 2)  # Welch-Satterthwaite df always lies between these
    return (min(float(sps.t.cdf(t_lo, df)) for df in dfs), max(float(sps.t.cdf(t_hi, df)) for df in dfs))


def decided_verdict(new: ArmScores, old: ArmScores, margin: float, alpha: float,
                    spread_new: float, spread_old: float) -> bool | None:
    """`p < alpha` if it holds (or fails) for every outcome of the remaining seeds; None when undecided."""
    if new.remaining == 0 and old.remaining == 0:  # nothing left to come: the verdict is the table's
        p = stats.welch(new.values, old.values, margin=margin).p_value
        return bool(p < alpha) if math.isfinite(p) else False
    if len(new.values) < 2 or len(old.values) < 2:
        return None
    x_new, x_old = np.asarray(new.values, dtype=np.float64), np.asarray(old.values, dtype=np.float64)
    box_new, box_old = plausible_box(new, spread_new), plausible_box(old, spread_old)
    lows, highs = [], []
    for add_new in range(new.remaining + 1):  # any of them may also fail and add nothing
        for add_old in range(old.remaining + 1):
            bounds = _p_bounds((x_new, add_new, box_new), (x_old, add_old, box_old), margin)
            if bounds is None:
                return None
            lows.append(bounds[0])
            highs.append(bounds[1])
    if max(highs) < alpha:
        return True
    if min(lows) >= alpha:
        return False
    return None


def pooled_std(arms: Sequence[ArmScores]) -> float:
    """The within-arm standard deviation pooled over every arm with two finished seeds."""
    tested = [np.asarray(a.values, dtype=np.float64) for a in arms if len(a.values) > 1]
    df = sum(x.size - 1 for x in tested)
    return math.sqrt(sum(float(np.sum((x - x.mean()) ** 2)) for x in tested) / df) if df else math.nan


def plausible_spread(arm: ArmScores, pooled: float) -> float:
    """The deviation that widens an arm's box: its own, or the pooled one where that is larger."""
    own = stats.sample_std(arm.values) if len(arm.values) > 1 else math.nan
    return max(own, pooled) if math.isfinite(pooled) else own


def decide(baseline: ArmScores, variants: Mapping[str, ArmScores]) -> dict[str, dict[str, bool | None]]:
    """Each variant's practice and rule verdicts against the baseline where the remaining seeds cannot change
    them; None marks one still open."""
    pooled = pooled_std([baseline, *variants.values()])

    def spread(arm: ArmScores) -> float:
        return plausible_spread(arm, pooled)

    out: dict[str, dict[str, bool | None]] = {}
    for name, arm in variants.items():
        rates = [a.tokens_per_byte for a in (arm, baseline) if a.tokens_per_byte]
        margin = stats.nats_to_bpb(stats.RULE_MARGIN_NATS, float(np.mean(rates))) if rates else None
        out[name] = {
            "practice": decided_verdict(arm, baseline, 0.0, stats.PRACTICE_ALPHA, spread(arm), spread(baseline)),
            "rule": None if margin is None else decided_verdict(arm, baseline, margin, stats.RULE_ALPHA,
                                                                spread(arm), spread(baseline)),
        }
    return out


def all_decided(verdicts: Mapping[str, Mapping[str, bool | None]]) -> bool:
    return bool(verdicts) and all(v is not None for arm in verdicts.values() for v in arm.values())


STOP_RULE = (f"every variant's practice (p < {stats.PRACTICE_ALPHA}) and rule (p < {stats.RULE_ALPHA}, "
             f"{stats.RULE_MARGIN_NATS}-nat margin) verdict stays the same for any outcome of the seeds not yet run: "
             f"each may fail or land anywhere in its arm's observed range widened by {PLAUSIBLE_STDS:g} standard "
             "deviations")

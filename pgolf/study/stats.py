"""The leaderboard's statistics on per-seed scores: Welch tests, margins, Holm, power, factorial effects.

Two conventions decide whether a new arm beats an old one (../shared/reference/challenge.md §1):
the leaderboard's practice, a one-sided Welch t-test of per-seed val_bpb at p < 0.25 with no
margin, and the written rule, p < 0.01 for an improvement of at least 0.005 nats per token,
converted to bpb with the runs' own tokens per byte. Both are reported side by side; nothing
here drops seeds. `judge` also runs the tests people actually printed (frontier.md §2.2): Welch
from submission.json's mean and std (which reproduces the May-2 rows, and inherits a population
SD's downward bias, so it says when a std is one), seed-matched pairs, a one-sample test against
a fixed score, and two-sided variants; each result carries the exact scipy call that made it.
Besides pgolf.errors, only numpy and scipy are imported, so `pgolf stats` starts without torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from itertools import combinations
from typing import Any

import numpy as np
from scipy import stats as sps

LN2 = math.log(2.0)
PRACTICE_ALPHA = 0.25  # the leaderboard's p-value cutoff since late April (PR #1902)
RULE_ALPHA = 0.01  # the README's written rule
RULE_MARGIN_NATS = 0.005  # ... for an improvement of at least this many nats per token
POWER = 0.8
POWER_ALPHA = 0.01
CI_LEVEL = 0.95
MAX_SEEDS = 100_000
SCIPY_CALL = "scipy.stats.ttest_ind(new, old, equal_var=False, alternative='less')"


def nats_to_bpb(nats: float, tokens_per_byte: float) -> float:
    """A per-token loss difference in nats as bits per byte: val_bpb = val_loss / ln 2 * tokens/byte."""
    return nats * tokens_per_byte / LN2


def bpb_to_nats(bpb: float, tokens_per_byte: float) -> float:
    return bpb * LN2 / tokens_per_byte


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """scipy warns on degenerate samples (zero variance); the NaN it returns says enough."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def sample_std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


@dataclass
class TTest:
    """One scipy t-test: statistic, df, p-value, the 95% interval of the difference it tests
    (new - old, or new - threshold; never shifted by a margin) and the exact call that made it,
    numbers included, so a reader can paste it into Python and get the same p."""

    t: float
    df: float
    p_value: float
    ci_low: float
    ci_high: float
    call: str


def _untested(call: str) -> TTest:
    return TTest(math.nan, math.nan, math.nan, math.nan, math.nan, call)


def _num(x: float) -> str:
    return repr(float(x))


def _array(values: Sequence[float], margin: float = 0.0) -> str:
    text = "[" + ", ".join(_num(v) for v in values) + "]"
    return f"np.add({text}, {_num(margin)})" if margin else text


def welch(new: Sequence[float], old: Sequence[float], *, alternative: str = "less", margin: float = 0.0) -> TTest:
    """`scipy.stats.ttest_ind(new + margin, old, equal_var=False)`: Welch's test of per-seed scores (ddof=1).

    Shifting the new arm up by the margin turns "new beats old by at least the margin" into
    the plain test the leaderboard runs (margin 0). NaN when an arm has fewer than two scores.
    """
    call = f"scipy.stats.ttest_ind({_array(new, margin)}, {_array(old)}, equal_var=False, alternative='{alternative}')"
    if len(new) < 2 or len(old) < 2:
        return _untested(call)
    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    res = _quiet(sps.ttest_ind, a + margin, b, equal_var=False, alternative=alternative)
    ci = _quiet(_quiet(sps.ttest_ind, a, b, equal_var=False).confidence_interval, CI_LEVEL)
    return TTest(float(res.statistic), float(res.df), float(res.pvalue), float(ci.low), float(ci.high), call)


def welch_from_summary(new: Summary, old: Summary, *, alternative: str = "less", margin: float = 0.0) -> TTest:
    """`scipy.stats.ttest_ind_from_stats(..., equal_var=False)`: Welch's test from each arm's mean, std and n.

    This is how the May-2 leaderboard rows were computed, from submission.json's `val_bpb` and
    `val_bpb_std` (../shared/reference/frontier.md §2.2). scipy takes the std as a sample SD;
    a population SD (ddof=0) shrinks the standard error and the p-value with it.
    """
    shifted = f"{_num(new.mean)} + {_num(margin)}" if margin else _num(new.mean)
    call = (f"scipy.stats.ttest_ind_from_stats({shifted}, {_num(new.std)}, {new.n}, {_num(old.mean)}, "
            f"{_num(old.std)}, {old.n}, equal_var=False, alternative='{alternative}')")
    if new.n < 2 or old.n < 2 or not (math.isfinite(new.std) and math.isfinite(old.std)):
        return _untested(call)
    res = _quiet(sps.ttest_ind_from_stats, new.mean + margin, new.std, new.n, old.mean, old.std, old.n,
                 equal_var=False, alternative=alternative)
    with np.errstate(all="ignore"):
        vn, vo = np.float64(new.std) ** 2 / new.n, np.float64(old.std) ** 2 / old.n
        df = float((vn + vo) ** 2 / (vn**2 / (new.n - 1) + vo**2 / (old.n - 1)))
        half = float(_quiet(sps.t.ppf, 0.5 + CI_LEVEL / 2, df) * np.sqrt(vn + vo))
    delta = new.mean - old.mean
    return TTest(float(res.statistic), df, float(res.pvalue), delta - half, delta + half, call)


def paired(new: Sequence[float], old: Sequence[float], *, alternative: str = "less", margin: float = 0.0) -> TTest:
    """`scipy.stats.ttest_rel(new + margin, old)`: the t-test of seed-matched differences.

    new[i] and old[i] ran the same seed (or the same trained artifact): the seed's share of the
    noise cancels, which makes eval-only and export-only changes testable with few seeds.
    """
    call = f"scipy.stats.ttest_rel({_array(new, margin)}, {_array(old)}, alternative='{alternative}')"
    if len(new) != len(old) or len(new) < 2:
        return _untested(call)
    a, b = np.asarray(new, dtype=np.float64), np.asarray(old, dtype=np.float64)
    res = _quiet(sps.ttest_rel, a + margin, b, alternative=alternative)
    ci = _quiet(_quiet(sps.ttest_rel, a, b).confidence_interval, CI_LEVEL)
    return TTest(float(res.statistic), float(res.df), float(res.pvalue), float(ci.low), float(ci.high), call)


def one_sample(new: Sequence[float], threshold: float, *, alternative: str = "less", margin: float = 0.0) -> TTest:
    """`scipy.stats.ttest_1samp(new + margin, threshold)`: the new seeds against a fixed score.

    The March records tested this way, against the record's score minus the margin
    (../shared/reference/challenge.md §1.2, phase A).
    """
    call = f"scipy.stats.ttest_1samp({_array(new, margin)}, {_num(threshold)}, alternative='{alternative}')"
    if len(new) < 2:
        return _untested(call)
    a = np.asarray(new, dtype=np.float64)
    res = _quiet(sps.ttest_1samp, a + margin, threshold, alternative=alternative)
    ci = _quiet(_quiet(sps.ttest_1samp, a, threshold).confidence_interval, CI_LEVEL)
    return TTest(float(res.statistic), float(res.df), float(res.pvalue), float(ci.low) - threshold,
                 float(ci.high) - threshold, call)


def paired_less(new: Mapping[int, float], old: Mapping[int, float]) -> dict[str, Any] | None:
    """Paired-by-seed one-sided t-test (H1: new lower), when both arms ran the same seeds."""
    seeds = sorted(new)
    if sorted(old) != seeds or len(seeds) < 2:
        return None
    a, b = [new[s] for s in seeds], [old[s] for s in seeds]
    test = paired(a, b)
    return {"n": len(seeds), "mean_diff": float(np.mean(np.subtract(a, b))), "t": test.t, "df": test.df,
            "p_value": test.p_value}


@dataclass(frozen=True)
class Summary:
    """An arm as a submission reports it: mean, standard deviation and number of seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """The summary of per-seed scores, with the sample SD (ddof=1) that scipy's from-stats test assumes."""
        return cls(float(np.mean(values)), sample_std(values), len(values))


def pool_summaries(parts: Sequence[Summary]) -> Summary:
    """One arm from several sources' summaries: the mean and sample SD of all their seeds together.

    Exact when every std is a sample SD (ddof=1): the pooled sum of squares is each part's
    (n - 1) s^2 plus its n (mean - grand mean)^2.
    """
    if len(parts) == 1:
        return parts[0]
    n = sum(p.n for p in parts)
    mean = sum(p.n * p.mean for p in parts) / n
    ss = sum((p.n - 1) * p.std**2 + p.n * (p.mean - mean) ** 2 for p in parts)
    return Summary(mean, math.sqrt(ss / (n - 1)), n)


def printed_precision(x: float) -> float:
    """Half a unit in the last digit of a number as it was written (0.0009 -> 0.00005)."""
    exponent = Decimal(repr(float(x))).as_tuple().exponent
    return 0.5 * 10.0**exponent if isinstance(exponent, int) else 0.0


def std_ddof(reported: float, values: Sequence[float]) -> int | None:
    """Which SD of the seeds a reported std is: 0 (population), 1 (sample) or None (neither).

    A match allows the figure's rounding (half a unit in its last digit) or 1% of that SD,
    whichever is larger; when both SDs match (many seeds), the nearer one wins.
    """
    if len(values) < 2 or not math.isfinite(reported):
        return None
    gaps = {ddof: abs(reported - float(np.std(values, ddof=ddof))) for ddof in (0, 1)}
    matches = {ddof: gap for ddof, gap in gaps.items()
               if gap <= max(printed_precision(reported), 0.01 * float(np.std(values, ddof=ddof)))}
    return min(matches, key=lambda ddof: matches[ddof]) if matches else None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment; NaN p-values (untestable arms) stay NaN and are not counted."""
    finite = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    finite.sort()
    m = len(finite)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def power_one_sided(n: int, effect: float, sigma: float, alpha: float = POWER_ALPHA, samples: int = 2) -> float:
    """Power of the one-sided t-test with n seeds: two-sample with n per arm (equal variances), or
    with samples=1 one-sample and paired (sigma is then the SD of the scores or of the differences)."""
    if samples == 2:
        df, ncp = 2 * n - 2, abs(effect) / (sigma * math.sqrt(2.0 / n))
    else:
        df, ncp = n - 1, abs(effect) / (sigma / math.sqrt(n))
    return float(sps.nct.sf(sps.t.isf(alpha, df), df, ncp))


def seeds_needed(delta: float, sigma: float, alpha: float = POWER_ALPHA, power: float = POWER,
                 samples: int = 2) -> int | None:
    """Seeds (per arm) for a one-sided t-test at `alpha` to detect `delta` (< 0: new better) with `power`.

    None when the new arm is not better (delta >= 0) or the inputs are unknown, or when more
    than MAX_SEEDS would be needed.
    """
    if not (math.isfinite(delta) and math.isfinite(sigma)) or delta >= 0:
        return None
    if sigma == 0:
        return 2
    if power_one_sided(MAX_SEEDS, delta, sigma, alpha, samples) < power:
        return None
    lo, hi = 2, 2
    while power_one_sided(hi, delta, sigma, alpha, samples) < power:
        lo, hi = hi, hi * 2
    while lo < hi:  # power grows with n: the smallest n reaching it
        mid = (lo + hi) // 2
        if power_one_sided(mid, delta, sigma, alpha, samples) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Comparison:
    """A new arm against an old one, in bpb (and nats where tokens per byte is known)."""

    n_new: int
    n_old: int
    mean_new: float
    mean_old: float
    std_new: float
    std_old: float
    delta: float  # mean_new - mean_old in bpb; negative = the new arm is better
    ci_low: float
    ci_high: float
    t: float
    df: float
    p_value: float
    tokens_per_byte: float | None
    delta_nats: float | None
    ci_nats: tuple[float, float] | None
    margin_nats: float
    margin_bpb: float | None
    t_margin: float | None
    df_margin: float | None
    p_value_margin: float | None
    seeds_needed: int | None
    paired: dict[str, Any] | None = None
    scipy_call: str = SCIPY_CALL
    verdicts: dict[str, bool | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def compare(new: Sequence[float], old: Sequence[float], *, tokens_per_byte: float | None = None,
            margin_nats: float = RULE_MARGIN_NATS, new_by_seed: Mapping[int, float] | None = None,
            old_by_seed: Mapping[int, float] | None = None) -> Comparison:
    """Every statistic the two conventions need for one pair of arms (scores in bpb, lower is better)."""
    new = [float(x) for x in new]
    old = [float(x) for x in old]
    mean_new = float(np.mean(new)) if new else math.nan
    mean_old = float(np.mean(old)) if old else math.nan
    std_new, std_old = sample_std(new), sample_std(old)
    delta = mean_new - mean_old
    test = welch(new, old)
    ci_low, ci_high = test.ci_low, test.ci_high
    margin_bpb = t_m = df_m = p_m = None
    delta_nats = ci_nats = None
    if tokens_per_byte is not None and tokens_per_byte > 0:
        margin_bpb = nats_to_bpb(margin_nats, tokens_per_byte)
        margin_test = welch(new, old, margin=margin_bpb)
        t_m, df_m, p_m = margin_test.t, margin_test.df, margin_test.p_value
        delta_nats = bpb_to_nats(delta, tokens_per_byte)
        ci_nats = (bpb_to_nats(ci_low, tokens_per_byte), bpb_to_nats(ci_high, tokens_per_byte))
    sigma = math.sqrt((std_new**2 + std_old**2) / 2) if len(new) > 1 and len(old) > 1 else math.nan
    paired = paired_less(new_by_seed, old_by_seed) if new_by_seed is not None and old_by_seed is not None else None
    comparison = Comparison(
        n_new=len(new), n_old=len(old), mean_new=mean_new, mean_old=mean_old, std_new=std_new, std_old=std_old,
        delta=delta, ci_low=ci_low, ci_high=ci_high, t=test.t, df=test.df, p_value=test.p_value,
        tokens_per_byte=tokens_per_byte, delta_nats=delta_nats, ci_nats=ci_nats, margin_nats=margin_nats,
        margin_bpb=margin_bpb, t_margin=t_m, df_margin=df_m, p_value_margin=p_m,
        seeds_needed=seeds_needed(delta, sigma), paired=paired)
    comparison.verdicts = verdicts(comparison.p_value, comparison.p_value_margin)
    return comparison


def verdicts(p_value: float, p_value_margin: float | None) -> dict[str, bool | None]:
    """`practice`: one-sided Welch p < 0.25, no margin. `rule`: p < 0.01 with the 0.005-nat margin
    (None when the margin could not be converted to bpb)."""
    practice = bool(p_value < PRACTICE_ALPHA) if math.isfinite(p_value) else False
    if p_value_margin is None:
        rule = None
    else:
        rule = bool(p_value_margin < RULE_ALPHA) if math.isfinite(p_value_margin) else False
    return {"practice": practice, "rule": rule}


# --- factorial designs -----------------------------------------------------------------------


@dataclass
class Effect:
    """A contrast of cell means: estimate, standard error from the pooled within-cell variance, two-sided test."""

    name: str
    estimate: float
    se: float
    df: float
    t: float
    p_value: float
    ci_low: float
    ci_high: float


def _contrast(name: str, coefficients: np.ndarray, means: np.ndarray, counts: np.ndarray, pooled_var: float,
              df: int) -> Effect:
    estimate = float(coefficients @ means)
    se = math.sqrt(pooled_var * float(np.sum(coefficients**2 / counts))) if df > 0 else math.nan
    if df > 0 and se > 0:
        t = estimate / se
        p = float(2 * sps.t.sf(abs(t), df))
        half = float(sps.t.ppf(0.975, df)) * se
    else:
        t = p = half = math.nan
    return Effect(name, estimate, se, float(df), t, p, estimate - half, estimate + half)


def factorial_effects(cells: Mapping[frozenset[str], Mapping[int, float]], factors: Sequence[str]) -> dict[str, Any]:
    """Main effects and two-way interactions of a 2^k design from per-cell, per-seed scores.

    Main effect of A: mean over cells with A on minus mean over cells with A off (each cell
    weighted equally, as in a balanced design). Interaction A x B: how much more A changes the
    score when B is on than when B is off, averaged over the other factors. When every cell ran
    the same seeds, the seeds are blocks (a seed fixes initialisation and data order for every
    arm), so their differences leave the error term: residual variance of the additive
    cell + seed model, df = (cells - 1)(seeds - 1). Otherwise the variance is pooled within
    cells (df = runs - cells). Needs every cell filled.
    """
    factors = list(factors)
    keys = [frozenset(c) for c in _all_subsets(factors)]
    missing = [sorted(k) for k in keys if len(cells.get(k, {})) == 0]
    if missing:
        return {"available": False, "reason": f"{len(missing)} cell(s) have no finished run"}
    values = {k: np.array(list(cells[k].values()), dtype=np.float64) for k in keys}
    means = np.array([values[k].mean() for k in keys])
    counts = np.array([values[k].size for k in keys], dtype=np.float64)
    seed_sets = {frozenset(cells[k]) for k in keys}
    blocked = len(seed_sets) == 1 and len(next(iter(seed_sets))) > 1
    if blocked:
        seeds = sorted(next(iter(seed_sets)))
        grid = np.array([[cells[k][seed] for seed in seeds] for k in keys], dtype=np.float64)
        residual = grid - grid.mean(axis=1, keepdims=True) - grid.mean(axis=0, keepdims=True) + grid.mean()
        df = (len(keys) - 1) * (len(seeds) - 1)
        ss = float(np.sum(residual**2))
    else:
        df = int(counts.sum() - len(keys))
        ss = sum(float(np.sum((values[k] - values[k].mean()) ** 2)) for k in keys)
    pooled = ss / df if df > 0 else math.nan
    sign = {f: np.array([1.0 if f in k else -1.0 for k in keys]) for f in factors}
    half = len(keys) / 2
    main = [_contrast(f, sign[f] / half, means, counts, pooled, df) for f in factors]
    inter = [_contrast(f"{a} x {b}", sign[a] * sign[b] / (len(keys) / 4), means, counts, pooled, df)
             for a, b in combinations(factors, 2)]
    return {"available": True, "blocked_by_seed": blocked, "df": df,
            "residual_std": math.sqrt(pooled) if math.isfinite(pooled) else math.nan,
            "main": [asdict(e) for e in main], "interactions": [asdict(e) for e in inter]}


def _all_subsets(items: Sequence[str]) -> Iterable[tuple[str, ...]]:
    for r in range(len(items) + 1):
        yield from combinations(items, r)


def json_safe(value: Any) -> Any:
    """NaN and infinities become null, so summary files stay strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value

"""pgolf.stats against independent computations written here, and the `pgolf stats` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate, special
from scipy import stats as sps
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.study import stats
from tests.conftest import REPO

NEW = [1.11508120, 1.11437394, 1.11475014]  # PR #1019's seeds, and PR #549's it beat (challenge.md §1.2)
OLD = [1.11922988, 1.12002032, 1.11888882]


def t_cdf(t: float, df: float) -> float:
    """Student's t CDF from the regularized incomplete beta function."""
    tail = 0.5 * special.betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t < 0 else 1 - tail


def welch_by_hand(new, old, margin=0.0):
    n, m = len(new), len(old)
    vn, vo = np.var(new, ddof=1) / n, np.var(old, ddof=1) / m
    se = math.sqrt(vn + vo)
    t = (np.mean(new) + margin - np.mean(old)) / se
    df = (vn + vo) ** 2 / (vn**2 / (n - 1) + vo**2 / (m - 1))
    return t, df, t_cdf(t, df), se


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_the_formulas(seed):
    rng = np.random.default_rng(seed)
    new, old = rng.normal(1.080, 0.0007, 3), rng.normal(1.081, 0.0004, 4)
    got = stats.welch_less(new, old)
    t, df, p, _ = welch_by_hand(new, old)
    assert got.t == pytest.approx(t, rel=1e-10) and got.df == pytest.approx(df, rel=1e-10)
    assert got.p_value == pytest.approx(p, rel=1e-8)
    with_margin = stats.welch_less(new, old, margin=0.001)
    t, df, p, _ = welch_by_hand(new, old, margin=0.001)
    assert with_margin.t == pytest.approx(t, rel=1e-10) and with_margin.p_value == pytest.approx(p, rel=1e-8)


def test_the_published_welch_example_and_the_scipy_call():
    got = stats.welch_less(NEW, OLD)
    assert got.t == pytest.approx(-11.83, abs=0.005) and got.df == pytest.approx(3.31, abs=0.005)
    direct = sps.ttest_ind(NEW, OLD, equal_var=False, alternative="less")
    assert got.p_value == direct.pvalue


def test_the_interval_of_the_difference():
    low, high = stats.welch_interval(NEW, OLD)
    t, df, _, se = welch_by_hand(NEW, OLD)
    half = sps.t.ppf(0.975, df) * se
    delta = np.mean(NEW) - np.mean(OLD)
    assert low == pytest.approx(delta - half, rel=1e-9) and high == pytest.approx(delta + half, rel=1e-9)


@pytest.mark.parametrize(("tokens_per_byte", "bpb"), [(0.40945, 0.00295), (0.26834, 0.00194), (0.31674, 0.00228)])
def test_the_margin_in_bpb_per_tokenizer(tokens_per_byte, bpb):
    """The conversions challenge.md §1.3 tabulates for SP1024, SP8192 and CaseOps."""
    assert stats.nats_to_bpb(0.005, tokens_per_byte) == pytest.approx(bpb, abs=5e-6)
    assert stats.bpb_to_nats(stats.nats_to_bpb(0.005, tokens_per_byte), tokens_per_byte) == pytest.approx(0.005)


def test_holm_agrees_with_the_step_down_procedure():
    """H_i is rejected at level a by Holm's procedure exactly when its adjusted p is at most a."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, 5))
        adjusted = stats.holm(p)
        for alpha in np.linspace(0.001, 0.5, 120):
            rejected, m = set(), len(p)
            for k, i in enumerate(np.argsort(p)):
                if p[i] > alpha / (m - k):
                    break
                rejected.add(int(i))
            assert rejected == {i for i, a in enumerate(adjusted) if a <= alpha}
    assert stats.holm([0.01, math.nan, 0.04]) == pytest.approx([0.02, math.nan, 0.04], nan_ok=True)


def test_paired_by_seed():
    new = {42: 1.0801, 314: 1.0795, 999: 1.0812}
    old = {999: 1.0820, 42: 1.0804, 314: 1.0801}
    got = stats.paired_less(new, old)
    d = np.array([new[s] - old[s] for s in (42, 314, 999)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert got["t"] == pytest.approx(t, rel=1e-10) and got["p_value"] == pytest.approx(t_cdf(t, 2), rel=1e-8)
    assert stats.paired_less(new, {42: 1.0, 7: 1.0, 999: 1.0}) is None  # different seeds: no pairing


def power_by_integration(n: int, delta: float, sigma: float, alpha: float) -> float:
    """Power of the one-sided two-sample t-test, integrating the noncentral t over the chi-square."""
    df = 2 * n - 2
    crit = sps.t.ppf(1 - alpha, df)
    shift = abs(delta) / (sigma * math.sqrt(2 / n))
    lo, hi = sps.chi2.ppf(1e-13, df), sps.chi2.isf(1e-13, df)  # where the chi-square has its mass
    value, _ = integrate.quad(lambda v: sps.norm.sf(crit * math.sqrt(v / df) - shift) * sps.chi2.pdf(v, df),
                              lo, hi, limit=200)
    return value


@pytest.mark.parametrize(("delta", "sigma"), [(-0.0005, 0.0007), (-0.001, 0.0005), (-0.0002, 0.0009)])
def test_seeds_needed_is_the_smallest_n_with_enough_power(delta, sigma):
    n = stats.seeds_needed(delta, sigma)
    assert power_by_integration(n, delta, sigma, 0.01) >= 0.8 > power_by_integration(n - 1, delta, sigma, 0.01)
    z = sps.norm.isf(0.01) + sps.norm.isf(0.2)
    assert n >= 2 * z**2 * sigma**2 / delta**2  # never fewer than the normal approximation asks
    assert stats.seeds_needed(0.001, sigma) is None  # a worse variant needs no seeds to be shown better


@pytest.mark.parametrize("complete_blocks", [True, False])
def test_factorial_effects_match_least_squares(complete_blocks):
    """Effects are the factor columns of a least-squares fit: the saturated cell model, plus one
    column per seed when every cell ran the same seeds (seeds as blocks)."""
    rng = np.random.default_rng(7)
    factors, seeds = ["a", "b", "c"], [42, 314, 999]
    seed_shift = dict(zip(seeds, rng.normal(0, 0.004, 3), strict=True))  # a seed moves every arm alike
    cells, rows, ys = {}, [], []
    for on in [(), ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]:
        ran = seeds[:2] if not complete_blocks and on == ("b",) else seeds
        cells[frozenset(on)] = {}
        x = {f: 0.5 if f in on else -0.5 for f in factors}
        for seed in ran:
            y = 1.08 - 0.002 * ("a" in on) + 0.001 * ("a" in on and "b" in on) + seed_shift[seed] + rng.normal(0, 5e-4)
            cells[frozenset(on)][seed] = y
            row = [1, x["a"], x["b"], x["c"], x["a"] * x["b"], x["a"] * x["c"], x["b"] * x["c"], x["a"] * x["b"] * x["c"]]
            if complete_blocks:
                row += [float(seed == 314), float(seed == 999)]
            rows.append(row)
            ys.append(y)
    X, y = np.array(rows), np.array(ys)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    sigma2 = float(np.sum((y - X @ beta) ** 2)) / dof
    se = np.sqrt(sigma2 * np.diag(np.linalg.inv(X.T @ X)))
    got = stats.factorial_effects(cells, factors)
    assert got["df"] == dof and got["blocked_by_seed"] is complete_blocks
    expected = {"a": 1, "b": 2, "c": 3, "a x b": 4, "a x c": 5, "b x c": 6}
    for e in (*got["main"], *got["interactions"]):
        col = expected[e["name"]]
        assert e["estimate"] == pytest.approx(beta[col], rel=1e-9, abs=1e-12)
        assert e["se"] == pytest.approx(se[col], rel=1e-9)
        assert e["p_value"] == pytest.approx(2 * sps.t.sf(abs(beta[col] / se[col]), dof), rel=1e-7)
    main_a = next(e for e in got["main"] if e["name"] == "a")["estimate"]
    on_a = np.mean([np.mean(list(v.values())) for k, v in cells.items() if "a" in k])
    off_a = np.mean([np.mean(list(v.values())) for k, v in cells.items() if "a" not in k])
    assert main_a == pytest.approx(on_a - off_a)
    assert not stats.factorial_effects({frozenset(): {1: 1.0}}, ["a"])["available"]


def test_compare_gives_both_verdicts():
    c = stats.compare(NEW, OLD, tokens_per_byte=0.40945)
    assert c.delta == pytest.approx(np.mean(NEW) - np.mean(OLD))
    assert c.delta_nats == pytest.approx(c.delta * math.log(2) / 0.40945)
    assert c.margin_bpb == pytest.approx(0.005 * 0.40945 / math.log(2))
    assert c.p_value_margin == pytest.approx(welch_by_hand(NEW, OLD, c.margin_bpb)[2], rel=1e-8)
    assert c.verdicts == {"practice": True, "rule": c.p_value_margin < 0.01}
    no_tpb = stats.compare(NEW, OLD)
    assert no_tpb.verdicts["rule"] is None and no_tpb.p_value_margin is None
    close = stats.compare([1.0801, 1.0799, 1.0806], [1.0802, 1.0805, 1.0800], tokens_per_byte=0.27)
    assert 0.01 < close.p_value < 0.5 and close.verdicts["rule"] is False
    assert stats.verdicts(0.2, None) == {"practice": True, "rule": None}
    assert stats.verdicts(0.3, 0.005) == {"practice": False, "rule": True}
    one = stats.compare([1.0], [1.1, 1.2]).to_dict()
    assert one["p_value"] is None and one["verdicts"]["practice"] is False  # one seed cannot be tested


# --- the command -------------------------------------------------------------------------------------


def test_pgolf_stats_json():
    result = CliRunner().invoke(app, ["stats", "--new", ",".join(map(str, NEW)), "--old", ",".join(map(str, OLD)),
                                      "--tokens-per-byte", "0.40945", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    direct = sps.ttest_ind(NEW, OLD, equal_var=False, alternative="less")
    assert data["t"] == pytest.approx(direct.statistic) and data["df"] == pytest.approx(direct.df)
    assert data["p_value"] == pytest.approx(direct.pvalue)
    assert data["mean_new"] == pytest.approx(np.mean(NEW)) and data["mean_old"] == pytest.approx(np.mean(OLD))
    assert data["delta"] == pytest.approx(np.mean(NEW) - np.mean(OLD))
    assert data["verdicts"]["practice"] is True and data["p_value_margin"] is not None


def test_pgolf_stats_text_and_errors():
    runner = CliRunner()
    text = runner.invoke(app, ["stats", "--new", "1.0801,1.0799,1.0806", "--old", "1.0802,1.0805,1.0800"]).stdout
    assert "Welch df" in text and "alternative='less'" in text and "leaderboard practice" in text
    assert "not tested (pass --tokens-per-byte)" in text
    short = runner.invoke(app, ["stats", "--new", "1.08", "--old", "1.09,1.10"])
    assert short.exit_code == 2 and "at least two scores" in short.stderr
    bad = runner.invoke(app, ["stats", "--new", "1.08,x", "--old", "1.09,1.10"])
    assert bad.exit_code == 2 and "comma-separated numbers" in bad.stderr


def test_pgolf_stats_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from pgolf.cli import app; "
            "r = CliRunner().invoke(app, ['stats', '--new', '1.0,1.1', '--old', '1.2,1.3', '--json']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"

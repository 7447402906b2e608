"""pgolf.stats against independent computations written here, the leaderboard's printed p-values
(frontier.md §2.2, from the figures in tests/data/leaderboard_submissions.json), and `pgolf stats`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from scipy import integrate, special
from scipy import stats as sps
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.study import stats
from pgolf.study.submissions import read_submission
from tests.conftest import REPO, cli_imports_torch

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
    got = stats.welch(new, old)
    t, df, p, _ = welch_by_hand(new, old)
    assert got.t == pytest.approx(t, rel=1e-10) and got.df == pytest.approx(df, rel=1e-10)
    assert got.p_value == pytest.approx(p, rel=1e-8)
    with_margin = stats.welch(new, old, margin=0.001)
    t, df, p, _ = welch_by_hand(new, old, margin=0.001)
    assert with_margin.t == pytest.approx(t, rel=1e-10) and with_margin.p_value == pytest.approx(p, rel=1e-8)


def test_the_published_welch_example_and_the_scipy_call():
    got = stats.welch(NEW, OLD)
    assert got.t == pytest.approx(-11.83, abs=0.005) and got.df == pytest.approx(3.31, abs=0.005)
    direct = sps.ttest_ind(NEW, OLD, equal_var=False, alternative="less")
    assert got.p_value == direct.pvalue


def test_the_interval_of_the_difference():
    got = stats.welch(NEW, OLD)
    low, high = got.ci_low, got.ci_high
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
    assert data["test"]["t"] == direct.statistic and data["test"]["df"] == direct.df
    assert data["test"]["p_value"] == direct.pvalue
    assert data["new"]["mean"] == pytest.approx(np.mean(NEW)) and data["old"]["mean"] == pytest.approx(np.mean(OLD))
    assert data["delta"] == pytest.approx(np.mean(NEW) - np.mean(OLD))
    assert data["verdicts"]["practice"] is True
    assert data["test_margin"]["p_value"] == pytest.approx(welch_by_hand(NEW, OLD, data["margin_bpb"])[2], rel=1e-8)
    same = stats.compare(NEW, OLD, tokens_per_byte=0.40945)  # what pgolf ablate reports for the same arms
    assert data["seeds_needed"] == same.seeds_needed and data["verdicts"] == same.verdicts


def test_pgolf_stats_text():
    text = CliRunner().invoke(app, ["stats", "--new", "1.0801,1.0799,1.0806", "--old", "1.0802,1.0805,1.0800"]).stdout
    assert "scipy.stats.ttest_ind([1.0801, 1.0799, 1.0806], [1.0802, 1.0805, 1.08], equal_var=False, " \
           "alternative='less')" in text
    assert "one-sided test (H1: new lower)" in text and "leaderboard practice" in text
    assert "not tested (pass --tokens-per-byte)" in text


def test_pgolf_stats_does_not_import_torch():
    assert not cli_imports_torch("stats", "--new", "1.0,1.1", "--old", "1.2,1.3", "--json")


# --- how the leaderboard's printed p-values were computed (frontier.md §2.1-§2.2) ------------------------

LEADERBOARD = json.loads((REPO / "tests" / "data" / "leaderboard_submissions.json").read_text())
SUBMISSIONS = LEADERBOARD["submissions"]
OKEZUE = LEADERBOARD["reproductions"]["1855-okezue"]["seeds"]  # PR #1855 comment: the pooled arm's other 3 seeds


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, str]:
    """Each PR's submission.json written where the PR keeps it, in its own layout; PR -> records folder."""
    root = tmp_path_factory.mktemp("parameter-golf")
    folders = {}
    for pr, entry in SUBMISSIONS.items():
        file = root / f"pr{pr}" / entry["path"]
        file.parent.mkdir(parents=True)
        file.write_text(json.dumps(entry["submission"], indent=2))
        folders[pr] = str(file.parent)
    return folders


def pgolf_stats(*args: str) -> dict:
    result = CliRunner().invoke(app, ["stats", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def rerun(call: str) -> float:
    """The p-value of the scipy call a result names, evaluated afresh."""
    return float(eval(call, {"scipy": scipy, "np": np}).pvalue)  # noqa: S307 (pgolf's own output)


# (row, --new, --old, method; p in frontier.md §2.2's columns; the p the leaderboard printed; the method that printed it)
ROWS = [
    ("#2135 vs #2014", ["2135"], ["2014"], {"welch": 0.01385, "summary": 0.0095}, 0.014, "welch"),
    ("#2130 vs #2014", ["2130"], ["2014"], {"welch": 0.0243, "summary": 0.0151}, 0.015, "summary"),
    ("#2014 vs #1953", ["2014"], ["1953"], {"welch": 0.0202, "summary": 0.0109}, 0.011, "summary"),
    ("#1953 vs #1945", ["1953"], ["1945"], {"welch": 0.0904, "summary": 0.0631}, 0.063, "summary"),
    ("#1945 vs #1855", ["1945"], ["1855"], {"welch": 0.0560, "summary": 0.0341}, 0.034, "summary"),
    ("#1769 vs #1736", ["1769"], ["1736"], {"welch": 0.0625}, 0.063, "welch"),
    ("#1529 vs #1514", ["1529"], ["1514"], {"welch": 0.00093}, 0.001, "welch"),
    ("#1514 vs #1493", ["1514"], ["1493"], {"welch": 0.0204}, 0.020, "welch"),
]


def _rounds_to(value: float, figure: float) -> bool:
    """`figure` as printed: value agrees to the figure's last digit."""
    return abs(value - figure) <= stats.printed_precision(figure) * (1 + 1e-9)


@pytest.mark.parametrize(("row", "new", "old", "expected", "printed", "printed_by"), ROWS, ids=[r[0] for r in ROWS])
def test_the_printed_p_values_are_reproduced(records, row, new, old, expected, printed, printed_by):
    got = {}
    for method, figure in expected.items():
        result = pgolf_stats(*[f"--new={records[pr]}" for pr in new], *[f"--old={records[pr]}" for pr in old],
                             "--method", method)
        got[method] = result["test"]["p_value"]
        assert _rounds_to(got[method], figure), (row, method, got[method], figure)
        assert rerun(result["test"]["call"]) == got[method]  # the printed call is the one that was made
    assert round(got[printed_by], 3) == printed
    for method, p in got.items():  # frontier.md's finding: only the named method reproduces the printed figure
        assert (round(p, 3) == printed) is (method == printed_by), (row, method, p)


def test_the_1855_row_pools_its_reproduction_against_the_1868_rerun(records):
    """PR #1902: #1855's 3 seeds plus @okezue's 3 against #1868's compliance rerun: p=0.188 (0.1882)."""
    okezue = ",".join(f"{seed}:{score}" for seed, score in OKEZUE.items())
    rerun_arm = records["1868"] + "@compliance_rerun"
    result = pgolf_stats("--new", records["1855"], "--new", okezue, "--old", rerun_arm)
    assert result["new"]["n"] == 6 and result["old"]["n"] == 3
    assert _rounds_to(result["test"]["p_value"], 0.1882)
    seeds_1868 = SUBMISSIONS["1868"]["submission"]["compliance_rerun"]["seed_results"]
    pooled = [r["val_bpb"] for r in SUBMISSIONS["1855"]["submission"]["seed_results"].values()] + list(OKEZUE.values())
    direct = sps.ttest_ind(pooled, [r["val_bpb"] for r in seeds_1868.values()], equal_var=False, alternative="less")
    assert result["test"]["p_value"] == direct.pvalue
    same = pgolf_stats("--new", f"{records['1855']},{records['1855']}", "--old", rerun_arm)  # paths pool by comma too
    assert same["new"]["n"] == 6
    original = pgolf_stats("--new", records["1855"], "--new", okezue, "--old", records["1868"])
    assert original["old"]["scores"] == [r["val_bpb"] for r in SUBMISSIONS["1868"]["submission"]["seed_results"].values()]
    assert any("compliance_rerun" in note for note in original["notes"])  # the unread block is named


def test_best_of_seven_disclosure(records):
    """#1769 reported its best 5 of 7 seeds (p=0.063); its disclosed 7 give 0.106 (frontier.md §2.5)."""
    best = pgolf_stats("--new", records["1769"], "--old", records["1736"])
    assert any("seed_results_all_runs_disclosure" in note for note in best["notes"])
    every = pgolf_stats("--new", records["1769"] + "@seed_results_all_runs_disclosure", "--old", records["1736"])
    assert every["new"]["n"] == 7 and round(every["test"]["p_value"], 3) == 0.106


def test_summary_warns_about_population_sds_and_shows_the_per_seed_p(records):
    result = pgolf_stats("--new", records["2014"], "--old", records["1953"], "--method", "summary")
    assert [w.split(":")[0] for w in result["warnings"]] == [records["2014"], records["1953"]]
    assert all("population SD" in w and "ddof=0" in w for w in result["warnings"])
    per_seed = pgolf_stats("--new", records["2014"], "--old", records["1953"])
    assert result["per_seed"]["p_value"] == per_seed["test"]["p_value"]
    sample_sd = pgolf_stats("--new", records["2135"], "--old", records["2014"], "--method", "summary")
    assert not any(w.startswith(records["2135"]) for w in sample_sd["warnings"])  # #2135 reports the sample SD
    v21 = pgolf_stats("--new", records["1945"], "--old", records["1855"], "--method", "summary")
    assert any("is not the mean of its seeds" in w for w in v21["warnings"])  # 1.05943381 vs 1.05943725
    text = CliRunner().invoke(app, ["stats", "--new", records["2014"], "--old", records["1953"], "--method", "summary"])
    assert "per-seed Welch beside it: p = 0.02022" in text.stdout and "ttest_ind_from_stats(1.05759252, " in text.stdout


@pytest.mark.parametrize(("reported", "values", "ddof"), [
    (0.0009, [1.05989454, 1.06124613, 1.06208695], 0),  # #1855, written to 2 digits
    (0.00064246, [1.05867499, 1.05939426, 1.06024251], 0),  # #1945, within 1%
    (0.00035573, [1.05662016, 1.05610947, 1.05679341], 1),  # #2135
    (0.0005, [1.0, 1.1, 1.2], None),
    (0.1, [1.0], None),
])
def test_std_ddof(reported, values, ddof):
    assert stats.std_ddof(reported, values) == ddof


def test_pooled_summaries_equal_the_pooled_seeds():
    rng = np.random.default_rng(11)
    parts = [list(rng.normal(1.06, 0.001, n)) for n in (3, 2, 5)]
    pooled = stats.pool_summaries([stats.Summary.of(p) for p in parts])
    every = [x for p in parts for x in p]
    assert pooled.n == 10 and pooled.mean == pytest.approx(np.mean(every), rel=1e-12)
    assert pooled.std == pytest.approx(np.std(every, ddof=1), rel=1e-10)


def test_welch_from_summary_matches_the_per_seed_test_on_sample_sds():
    new, old = [1.0801, 1.0799, 1.0806], [1.0802, 1.0805, 1.0800, 1.0809]
    direct = stats.welch(new, old)
    from_stats = stats.welch_from_summary(stats.Summary.of(new), stats.Summary.of(old))
    for name in ("t", "df", "p_value", "ci_low", "ci_high"):
        assert getattr(from_stats, name) == pytest.approx(getattr(direct, name), rel=1e-9)


# --- submission.json layouts ---------------------------------------------------------------------------


def test_every_layout_reads_its_seeds_and_summary(records):
    expect = {
        "1855": ([42, 0, 1234], (1.06107587, 0.0009, 3)),  # seed_results -> {val_bpb, val_loss}
        "1514": ([0, 42, 1234], (1.07983273, 0.00049601, 3)),  # seeds -> {...}, mean_bpb / std_bpb
        "1285": ([42, 0, 1337], None),  # seeds + seed_scores, no std
        "2130": ([314, 42, 0], (1.0567, 0.00015, 3)),  # everything inside "results"
        "86": (None, (1.15015359, 0.00043, 3)),  # summary only (n_seeds)
    }
    for pr, (seeds, summary) in expect.items():
        source = read_submission(records[pr], "--new")
        assert source.seeds == seeds, pr
        assert (None if source.reported is None else (source.reported.mean, source.reported.std, source.reported.n)) \
            == summary, pr
    assert read_submission(records["1285"], "--new").scores == [1.09057, 1.09084, 1.09230]
    assert read_submission(records["2130"], "--new").label == records["2130"] + "@results"
    rerun_block = read_submission(records["1868"] + "@compliance_rerun", "--old")
    assert rerun_block.reported == stats.Summary(1.06141, 0.00093, 3)
    one_run = Path(records["86"]).parent / "one_seed"
    one_run.mkdir()
    (one_run / "submission.json").write_text(json.dumps({"val_loss": 1.9, "val_bpb": 1.125, "seed": 1337}))
    single = read_submission(str(one_run), "--new")  # the early single-run layout
    assert single.scores == [1.125] and single.seeds == [1337]
    assert single.tokens_per_byte == pytest.approx(1.125 * math.log(2) / 1.9)


@pytest.mark.parametrize(("pr", "tokens_per_byte"), [("2135", 0.31674), ("1529", 0.26834), ("1855", 0.31674)])
def test_tokens_per_byte_come_from_the_submission(records, pr, tokens_per_byte):
    """challenge.md §1.3: CaseOps 0.31674, SP8192 0.26834 tokens per byte."""
    assert read_submission(records[pr], "--new").tokens_per_byte == pytest.approx(tokens_per_byte, abs=5e-6)
    result = pgolf_stats("--new", records[pr], "--old", "1.2,1.3")
    assert result["tokens_per_byte_from"].startswith("val_bpb * ln 2 / val_loss of")
    assert result["margin_bpb"] == pytest.approx(stats.nats_to_bpb(0.005, result["tokens_per_byte"]))
    assert pgolf_stats("--new", records[pr], "--old", "1.2,1.3", "--tokens-per-byte", "0.4")["tokens_per_byte"] == 0.4


def test_summary_only_submissions_need_the_summary_method(records):
    result = CliRunner().invoke(app, ["stats", "--new", records["86"], "--old", "1.2,1.21,1.22"])
    assert result.exit_code == 2 and "only a reported mean and std" in result.stderr
    summary = pgolf_stats("--new", records["86"], "--old", "1.2,1.21,1.22", "--method", "summary")
    assert summary["per_seed"] is None and summary["new"]["n"] == 3
    assert any("no reported std" in note for note in summary["notes"])  # the list's SD was computed


# --- paired, one-sample, two-sided ------------------------------------------------------------------------


def test_paired_by_seed_reproduces_calib32_against_2130(records):
    """frontier.md §1.2: #2135 vs #2130 per-seed paired p=0.14."""
    result = pgolf_stats("--new", records["2135"], "--old", records["2130"], "--method", "paired")
    new = SUBMISSIONS["2135"]["submission"]["seed_results"]
    old = SUBMISSIONS["2130"]["submission"]["results"]["seeds"]
    seeds = sorted(new, key=int)
    direct = sps.ttest_rel([new[s]["val_bpb"] for s in seeds], [old[s]["val_bpb"] for s in seeds], alternative="less")
    assert result["test"]["p_value"] == direct.pvalue and round(direct.pvalue, 2) == 0.14
    assert "paired by seed (0, 42, 314)" in result["notes"]
    by_order = pgolf_stats("--new", "1.0801,1.0799,1.0806", "--old", "1.0803,1.0800,1.0809", "--method", "paired")
    assert by_order["test"]["p_value"] == sps.ttest_rel([1.0801, 1.0799, 1.0806], [1.0803, 1.0800, 1.0809],
                                                         alternative="less").pvalue


@pytest.mark.parametrize(("new", "old", "message"), [
    ("42:1.08,314:1.07", "42:1.09,999:1.08", "only in --new [314], only in --old [999]"),
    ("1.08,1.07,1.06", "1.09,1.08", "as many in --new (3) as in --old (2)"),
    ("42:1.08,314:1.07", "42:1.09,314", "names the seed of some scores but not of others"),
])
def test_paired_needs_matching_seeds(new, old, message):
    result = CliRunner().invoke(app, ["stats", "--new", new, "--old", old, "--method", "paired"])
    assert result.exit_code == 2 and message in result.stderr


def test_paired_rejects_a_seed_pooled_twice(records):
    result = CliRunner().invoke(app, ["stats", "--new", records["1855"], "--new", "42:1.06,0:1.061,1234:1.062",
                                      "--old", records["1855"], "--method", "paired"])
    assert result.exit_code == 2 and "seed 42 appears twice in --new" in result.stderr


@pytest.mark.parametrize(("scores", "threshold", "t", "p"), [
    ("1.1927,1.1935,1.1921,1.1929", "1.195", None, 0.00234486),  # records/.../2026-03-17_LoRA_TTT/README.md
    ("1337:1.20576485,1338:1.20617460,1339:1.20715923", "1.2193657", -31.42, 0.00051),  # .../LongContextSeq2048
])
def test_one_sample_reproduces_the_march_records(scores, threshold, t, p):
    result = pgolf_stats("--new", scores, "--method", "one-sample", "--threshold", threshold)
    assert _rounds_to(result["test"]["p_value"], p)
    if t is not None:
        assert _rounds_to(result["test"]["t"], t)
    assert result["test"]["call"].startswith("scipy.stats.ttest_1samp(") and result["old"] is None
    assert rerun(result["test"]["call"]) == result["test"]["p_value"]
    assert result["delta"] == pytest.approx(np.mean([float(x.split(":")[-1]) for x in scores.split(",")])
                                            - float(threshold))


def test_one_sample_margin_and_power():
    scores = [1.0801, 1.0799, 1.0806]
    result = pgolf_stats("--new", ",".join(map(str, scores)), "--method", "one-sample", "--threshold", "1.0830",
                         "--tokens-per-byte", "0.26834")
    margin = stats.nats_to_bpb(0.005, 0.26834)
    direct = sps.ttest_1samp(np.add(scores, margin), 1.0830, alternative="less")
    assert result["test_margin"]["p_value"] == direct.pvalue
    n = result["seeds_needed"]
    sigma, delta = np.std(scores, ddof=1), np.mean(scores) - 1.0830
    assert stats.power_one_sided(n, delta, sigma, samples=1) >= 0.8 > stats.power_one_sided(n - 1, delta, sigma,
                                                                                             samples=1)


@pytest.mark.parametrize("method", ["welch", "summary", "paired"])
def test_two_sided_doubles_p_and_passes_only_the_lower_arm(records, method):
    args = ["--new", records["2135"], "--old", records["2014"], "--method", method]
    one, two = pgolf_stats(*args), pgolf_stats(*args, "--two-sided")
    assert two["test"]["p_value"] == pytest.approx(2 * one["test"]["p_value"], rel=1e-9)
    assert "alternative='two-sided'" in two["test"]["call"] and rerun(two["test"]["call"]) == two["test"]["p_value"]
    worse = pgolf_stats("--new", records["2014"], "--old", records["2135"], "--method", method, "--two-sided")
    assert worse["test"]["p_value"] == pytest.approx(two["test"]["p_value"], rel=1e-9)  # same p, either direction
    assert two["verdicts"]["practice"] is True and worse["verdicts"]["practice"] is False


# --- bad input: one paragraph, exit 2 ----------------------------------------------------------------------


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "no_scores.json").write_text(json.dumps({"author": "x", "val_loss": 2.0}))
    (tmp / "broken.json").write_text('{"val_bpb": 1.08,\n')
    (tmp / "text_score.json").write_text(json.dumps({"seed_results": {"42": {"val_bpb": "1.08"}}}))
    return [
        (["--new", str(tmp / "missing" / "submission.json"), "--old", "1.0,1.1"], "no such file or folder"),
        (["--new", str(tmp / "empty"), "--old", "1.0,1.1"], "has no submission.json"),
        (["--new", str(tmp / "no_scores.json"), "--old", "1.0,1.1"], "no val_bpb scores found. Expected per-seed"),
        (["--new", str(tmp / "broken.json"), "--old", "1.0,1.1"], "line 2: not valid JSON"),
        (["--new", str(tmp / "text_score.json"), "--old", "1.0,1.1"], "key 'seed_results.42.val_bpb'"),
        (["--new", "1.08,x", "--old", "1.09,1.10"], "expects comma-separated numbers"),
        (["--new", "1.08", "--old", "1.09,1.10"], "needs at least two scores in --new"),
        (["--new", "1.08,1.07", "--old", "1.09,nan"], "'nan' is not a number"),
        (["--new", "1.08,1.07"], "needs --old"),
        (["--new", "1.08,1.07", "--method", "one-sample"], "needs --threshold"),
        (["--new", "1.08,1.07", "--old", "1.1,1.2", "--method", "one-sample", "--threshold", "1.1"], "--old is not used"),
        (["--new", "1.08,1.07", "--old", "1.1,1.2", "--threshold", "1.1"], "only to --method one-sample"),
        (["--new", "1.08,1.07", "--old", "1.1,1.2", "--method", "bayes"], "unknown --method 'bayes'"),
        (["--new", "1.08,1.07", "--old", "1.1,1.2", "--tokens-per-byte", "0"], "must be positive"),
    ]


def test_bad_inputs_exit_2_with_one_paragraph(tmp_path, records):
    cases = _bad_inputs(tmp_path) + [
        (["--new", records["1868"] + "@nope", "--old", "1.0,1.1"], "no block 'nope' in the file"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["stats", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
        assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)

"""Verdict logic and the tuning protocol's pure functions, on constructed numbers."""
import math

import pytest

from grace_app.studies.tuning import select_trial, trial_score
from grace_app.studies.verdicts import (FAILS, HOLDS, INCONCLUSIVE, Spread, all_of, at_least, evaluate_claim,
                                          greater, less, overlaps, paired_difference, seed_mean, spread,
                                          wilson_interval)


def test_spread_is_mean_and_sample_std():
    s = spread([10.0, 12.0, 14.0])
    assert s.mean == pytest.approx(12.0) and s.hi - s.mean == pytest.approx(2.0) and s.n == 3
    one = spread([50.0], interval=(45.0, 55.0))
    assert (one.lo, one.hi) == (45.0, 55.0)
    assert spread([50.0]).lo == spread([50.0]).hi == 50.0
    assert spread([None]) is None


@pytest.mark.parametrize("a,b,margin,expected", [
    (Spread(60, 58, 62), Spread(50, 48, 52), 0.0, HOLDS),
    (Spread(50, 48, 52), Spread(60, 58, 62), 0.0, FAILS),
    (Spread(55, 50, 60), Spread(54, 52, 56), 0.0, INCONCLUSIVE),
    # OOD within 1 point: 56.5 +- 0.2 vs 57.0 +- 0.2 -> above 57.2 - 1 = 56.2: holds
    (Spread(56.5, 56.3, 56.7), Spread(57.0, 56.8, 57.2), -1.0, HOLDS),
    # 55.0 +- 0.2 vs 57.0 +- 0.2: 55.2 <= 56.8 - 1 = 55.8: fails
    (Spread(55.0, 54.8, 55.2), Spread(57.0, 56.8, 57.2), -1.0, FAILS),
])
def test_greater(a, b, margin, expected):
    assert greater(a, b, margin) == expected


def test_less_and_missing_and_all_of():
    assert less(Spread(1, 1, 1), Spread(3, 2.5, 3.5)) == HOLDS
    assert greater(None, Spread(1, 1, 1)) == INCONCLUSIVE
    assert all_of([HOLDS, HOLDS]) == HOLDS
    assert all_of([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert all_of([HOLDS, INCONCLUSIVE, FAILS]) == FAILS
    assert all_of([]) == INCONCLUSIVE


@pytest.mark.parametrize("a,b,expected", [
    (Spread(30, 29, 31), Spread(31, 30, 32), HOLDS),  # 29 >= 0.9 * 32 = 28.8
    (Spread(20, 19, 21), Spread(31, 30, 32), FAILS),  # 21 < 0.9 * 30 = 27
    (Spread(28, 27, 29), Spread(31, 30, 32), INCONCLUSIVE),  # 27 < 28.8, 29 >= 27
])
def test_at_least_fraction(a, b, expected):
    assert at_least(a, b, 0.9) == expected
    claim = {"claim": "keeps 90%", "kind": "at_least", "a": "x", "b": "y", "metric": "adv", "fraction": 0.9}
    assert evaluate_claim(claim, {"x": {"adv": a}, "y": {"adv": b}})["verdict"] == expected


def test_seed_mean_refuses_a_missing_seed():
    m, s = seed_mean([10.0, 12.0, 14.0])
    assert m == pytest.approx(12.0) and s == pytest.approx(2.0)
    assert seed_mean([5.0]) == (5.0, None)
    assert seed_mean([10.0, None]) == (None, None) and seed_mean([10.0, float("nan")]) == (None, None)
    assert seed_mean([]) == (None, None)


def test_paired_difference_closed_form():
    # d = a - 0.5 b = [1, 2, 3] on the common seeds 0..2 (seed 9 is only in a): mean 2, sd 1, se 1/sqrt(3);
    # t_{0.975, 2} = 4.302652729911275 (tables)
    d = paired_difference({0: 3.0, 1: 4.0, 2: 5.0, 9: 100.0}, {0: 4.0, 1: 4.0, 2: 4.0}, 0.5)
    h = 4.302652729911275 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(2.0)
    assert (d.lo, d.hi) == (pytest.approx(2.0 - h), pytest.approx(2.0 + h))
    assert paired_difference({0: 1.0}, {0: 1.0}) is None  # one common seed: no interval


def test_at_least_pairs_by_seed():
    """The same spreads, paired: a consistent per-seed lead decides what the overlapping spreads cannot."""
    seeds = [0, 1, 2, 3, 4, 5]
    b_vals = [4.0, 6.0, 8.0, 5.0, 7.0, 3.0]
    a_vals = [v + 1.0 + 0.1 * (i % 2) for i, v in enumerate(b_vals)]  # a = b + 1.0 or 1.1: wide spreads, clear lead
    a, b = spread(a_vals, seeds=seeds), spread(b_vals, seeds=seeds)
    assert a.lo < 0.95 * b.hi  # the spread rule alone would say inconclusive
    assert at_least(a, b, 0.95) == HOLDS
    assert at_least(b, a, 1.0) == FAILS  # b - a = -1.0 or -1.1 on every seed
    claim = {"claim": "keeps 95%", "kind": "at_least", "a": "x", "b": "y", "metric": "adv", "fraction": 0.95}
    res = evaluate_claim(claim, {"x": {"adv": a}, "y": {"adv": b}})
    assert res["verdict"] == HOLDS and res["parts"][0]["paired"]["n"] == 6 and "paired over 6 seeds" in res["evidence"]
    # unpaired (different seeds): back to the spread rule
    other = spread(a_vals, seeds=[10, 11, 12, 13, 14, 15])
    assert at_least(other, b, 0.95) == INCONCLUSIVE
    noisy = spread([b_vals[i] + (3.0 if i % 2 else -2.5) for i in range(6)], seeds=seeds)
    assert at_least(noisy, b, 0.95) == INCONCLUSIVE  # d = 2.7..3.3 or -2.2..-2.4: interval straddles 0


def test_within_is_overlap():
    assert overlaps(Spread(50, 49, 51), Spread(52, 50.5, 53.5)) == HOLDS
    assert overlaps(Spread(50, 49, 51), Spread(52, 51.5, 52.5)) == FAILS
    assert overlaps(None, Spread(1, 1, 1)) == INCONCLUSIVE


def test_evaluate_claim_kinds():
    rows = {"grace": {"hm": Spread(40, 39, 41), "adv": Spread(30, 29, 31)},
            "ft": {"hm": Spread(20, 19, 21), "adv": Spread(0, 0, 0)},
            "tecoa": {"hm": Spread(40.5, 38, 43), "adv": Spread(35, 34, 36)}}
    best = evaluate_claim({"claim": "best HM", "kind": "greater_all", "a": "grace", "b": "all", "metric": "hm"}, rows)
    assert best["verdict"] == INCONCLUSIVE and [p["b"] for p in best["parts"]] == ["ft", "tecoa"]
    adv = evaluate_claim({"claim": "adv", "kind": "greater_all", "a": "grace", "b": ["ft"], "metric": "adv"}, rows)
    assert adv["verdict"] == HOLDS and "grace 30.00 [29.00, 31.00]" in adv["evidence"]
    steps = evaluate_claim({"claim": "steps", "kind": "steps", "metric": "adv",
                            "pairs": [["grace", "ft"], ["grace", "tecoa"]]}, rows)
    assert steps["verdict"] == FAILS and [p["verdict"] for p in steps["parts"]] == [HOLDS, FAILS]
    missing = evaluate_claim({"claim": "x", "kind": "less", "a": "grace", "b": "zs", "metric": "hm"}, rows)
    assert missing["verdict"] == INCONCLUSIVE and "zs not measured" in missing["evidence"]
    with pytest.raises(ValueError, match="unknown claim kind"):
        evaluate_claim({"claim": "x", "kind": "about", "metric": "hm"}, rows)


def test_wilson_interval_closed_form():
    lo, hi = wilson_interval(8, 10)  # p = 0.8, n = 10, z = the 97.5% normal quantile
    z, n, p = 1.959963984540054, 10, 0.8
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((100 * (c - h), 100 * (c + h)))
    assert lo == pytest.approx(49.016, abs=1e-2) and hi == pytest.approx(94.331, abs=1e-2)
    assert wilson_interval(0, 0) is None


def test_select_trial_rule_and_ties():
    """The highest score among selectable trials (finished, finite, not collapsed); ties to the higher mean, then
    the earlier trial; a re-scored trial is ranked by its mean over seeds."""
    rows = [dict(trial_score(90.0, 0.0), state="complete"), dict(trial_score(60.0, 30.0), state="complete"),
            dict(trial_score(50.0, 40.0), state="complete")]
    for r in rows:
        r["score"], r["feature_spread"] = r["hm"], 0.5
    assert rows[1]["hm"] == pytest.approx(40.0)
    assert select_trial(rows, 0.9) == 2  # hm 44.4 > 40 > 0
    rows[2]["feature_spread"] = 0.95  # collapsed: never selected
    assert select_trial(rows, 0.9) == 1
    rows[0]["seed_score"] = 41.0  # re-scored over seeds: ranked by that mean
    assert select_trial(rows, 0.9) == 0
    tie = [dict(rows[1], mean=40.0), dict(rows[1], mean=45.0)]
    assert select_trial(tie, 0.9) == 1
    assert select_trial([dict(rows[1], state="fail")], 0.9) is None

def test_feature_spread_closed_forms():
    """bench/feature_spread.py's statistics: identical features give cosines of 1; orthogonal class features 0;
    equal logits the entropy ln C; a one-hot-like head entropy ~0 and its top-1."""
    import importlib.util
    from pathlib import Path

    import torch

    spec = importlib.util.spec_from_file_location("feature_spread", Path(__file__).parents[1] / "bench" /
                                                  "feature_spread.py")
    fs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fs)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    same = fs.spread_stats(torch.ones(6, 4), y, torch.zeros(6, 5))
    assert same["cos_images"] == pytest.approx(1.0) and same["cos_centroids"] == pytest.approx(1.0)
    assert same["entropy"] == pytest.approx(math.log(5)) and same["ln_c"] == pytest.approx(math.log(5))
    eye = torch.eye(3)[y]  # each class its own axis
    sep = fs.spread_stats(eye, y, 50 * eye)
    # pairs of different images: 6 of the 30 ordered pairs share a class (cos 1), the rest 0
    assert sep["cos_images"] == pytest.approx(6 / 30) and sep["cos_centroids"] == pytest.approx(0.0)
    assert sep["entropy"] < 1e-6 and sep["top1"] == pytest.approx(100.0)


def test_study_paired_table_and_markdown():
    """study.md's paired-difference section: each row minus the reference on common seeds, 95% t interval."""
    import grace_app.studies.runner as studies

    seeds = [0, 1, 2]
    ref = {k: spread([10.0, 20.0, 30.0], seeds=seeds) for k in ("id", "ood", "adv", "hm")}
    row = {k: spread([13.0, 24.0, 35.0], seeds=seeds) for k in ("id", "ood", "adv", "hm")}  # d = 3, 4, 5
    table = studies._paired_table({"grace": ref, "lite": row}, "grace")
    h = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} x sd 1 / sqrt(3)
    assert list(table) == ["lite"] and table["lite"]["adv"]["n"] == 3
    assert table["lite"]["adv"]["mean"] == pytest.approx(4.0)
    assert table["lite"]["adv"]["ci95"] == [pytest.approx(4.0 - h), pytest.approx(4.0 + h)]
    assert studies._paired_table({"grace": ref}, None) == {}
    doc = {"study": "cost", "seeds": seeds, "steps": 1, "size": "default", "seconds": 0.0, "verdicts": [],
           "paired_reference": "grace",
           "paired": table, "column_definitions": {"ours": "x"},
           "rows": {n: {"label": n, "runs": [], "axes": {}} for n in ("grace", "lite")}}
    from grace_app.studies.study_page import study_markdown

    md = study_markdown(doc)
    assert "## Paired differences from grace" in md
    assert f"| lite | 3 | +4.00 [{4.0 - h:+.2f}, {4.0 + h:+.2f}]" in md


def test_a_metric_without_per_sample_results_is_paired_by_seed():
    """A geometry metric has one value per run and no per-sample results: "a < b" is decided on the paired Student-t
    interval over the common seeds (scipy's ttest_rel is the independent check), not on overlapping spreads."""
    from scipy import stats

    a_vals, b_vals = [10.0, 20.0, 30.0, 25.0], [10.6, 20.5, 30.7, 25.4]  # spreads overlap; a is below b every seed
    a, b = spread(a_vals, seeds=[0, 1, 2, 3]), spread(b_vals, seeds=[0, 1, 2, 3])
    assert a.lo < b.hi and b.lo < a.hi  # the spread rule could not decide
    res = evaluate_claim({"claim": "c", "kind": "less", "a": "x", "b": "y", "metric": "lambda_max"},
                         {"x": {"lambda_max": a}, "y": {"lambda_max": b}})
    assert res["verdict"] == HOLDS
    ci = stats.ttest_rel(b_vals, a_vals).confidence_interval(0.95)
    assert res["parts"][0]["paired"]["ci95"] == pytest.approx([ci.low, ci.high])  # y - x, the claim's "b > a"
    assert "y - x = " in res["evidence"] and "95% t interval over seeds" in res["evidence"]  # "less": b - a
    flipped = evaluate_claim({"claim": "c", "kind": "greater", "a": "x", "b": "y", "metric": "lambda_max"},
                             {"x": {"lambda_max": a}, "y": {"lambda_max": b}})
    assert flipped["verdict"] == FAILS
    single = {"x": {"lambda_max": spread([10.0], seeds=[0])}, "y": {"lambda_max": spread([11.0], seeds=[0])}}
    one = evaluate_claim({"claim": "c", "kind": "less", "a": "x", "b": "y", "metric": "lambda_max"}, single)
    assert "by spreads" in one["evidence"] and "paired" not in one["parts"][0]  # one seed: nothing to pair


def test_tuning_page_says_when_fewer_trials_than_the_top_were_rescored():
    """The tuning page names the re-scored trials and says so when fewer than ``rescore_top`` were selectable (GRACE's
    published tuning re-scored 2: the pruner left two finished, uncollapsed trials)."""
    from grace_app.studies.tuning_page import tuning_markdown

    def method(rescored):
        return {"score": "hm", "compute": {"trials": 4, "trial_steps": 900, "cpu_seconds": 10.0}, "collapsed": 0,
                "diverged": 0, "selected": rescored[0], "values": {"train.lr": 1e-3}, "at_range_edge": [],
                "rescored": [{"trial": t, "seed_results": {"0": {"hm": 30.0}}} for t in rescored], "trials": []}

    doc = {"size": "small", "seed": 0, "trials": 4, "steps": 300,
           "methods": {"a": dict(method([3, 1]), widenings=2), "b": method([0, 2, 1])},
           "protocol": {"collapse_spread": 0.9, "rescore_top": 3, "n_val_adv": 8}}
    summary = tuning_markdown(doc).split("## Best so far")[0]  # the first table: one row per method
    rows = {line.split(" | ")[0]: line for line in summary.splitlines() if line.startswith("| a |")
            or line.startswith("| b |")}
    assert "| 3, 1 (only 2 selectable of 3) |" in rows["| a"]
    assert rows["| a"].startswith("| a | hm | 4 (4 + 2 widening(s)) |") and rows["| b"].startswith("| b | hm | 4 |")
    assert "| 0, 2, 1 |" in rows["| b"] and "selectable of" not in rows["| b"]


@pytest.mark.parametrize("diffs,margin", [([0.1, -0.2, 0.3, 0.0, 0.15], 1.0), ([0.9, 1.4, 0.5, 1.1, 0.7], 1.0),
                                          ([-0.5, 0.6, -0.4, 0.5, 0.1], 1.0), ([2.0, -1.5, 0.4, 3.0, -2.2], 1.0),
                                          ([0.1, -0.2, 0.3, 0.0, 0.15], 0.2)])
def test_equivalence_is_two_one_sided_t_tests(diffs, margin):
    """``equivalence`` on a paired t difference equals TOST computed independently: both one-sided p-values
    (H0: d <= -margin, H0: d >= +margin) below 0.05 (scipy.stats.ttest_1samp)."""
    from scipy import stats

    from grace_app.studies.verdicts import equivalence, paired_difference

    a = {s: 50.0 + d for s, d in enumerate(diffs)}
    b = {s: 50.0 for s in range(len(diffs))}
    lower = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(diffs, margin, alternative="less").pvalue
    assert equivalence(paired_difference(a, b), margin) == bool(max(lower, upper) < 0.05)


def test_an_inconclusive_part_says_whether_it_is_a_tie():
    from grace_app.studies.verdicts import Spread, evaluate_claim

    def row(vals):
        return {"hm": Spread(sum(vals) / len(vals), min(vals), max(vals), len(vals), tuple(enumerate(vals)))}

    tie = evaluate_claim({"claim": "c", "kind": "greater", "metric": "hm", "a": "x", "b": "y"},
                         {"x": row([30.0, 30.2, 29.9, 30.1, 30.05]), "y": row([30.0, 30.1, 30.0, 30.0, 30.1])})
    assert tie["verdict"] == "inconclusive" and tie["parts"][0]["equivalent"] is True
    assert "equivalent within ±1 (TOST: 90% interval" in tie["evidence"]
    wide = evaluate_claim({"claim": "c", "kind": "greater", "metric": "hm", "a": "x", "b": "y"},
                          {"x": row([28.0, 33.0, 29.0, 32.0, 30.5]), "y": row([30.0, 30.1, 30.0, 30.0, 30.1])})
    assert wide["verdict"] == "inconclusive" and wide["parts"][0]["equivalent"] is False
    assert "not shown equivalent within ±1" in wide["evidence"]


def test_axes_under_the_papers_definition_match_the_report():
    """The paper's columns from per-sample results: OOD = mean of the v2/sketch/r sets, Adv = mean of the attack and
    the a set (the catalogue's paper column), as report.py computes them."""
    import numpy as np

    from grace_app.studies.verdicts import _axis_values

    rng = np.random.default_rng(0)
    data = {"id": rng.integers(0, 2, (2, 60)).astype(float), "adv": rng.integers(0, 2, (2, 60)).astype(float),
            "ood": {s: rng.integers(0, 2, (2, 50)).astype(float)
                    for s in ("synth-v2", "synth-sketch", "synth-rendition", "synth-a")}}
    ours, paper = _axis_values(data, {}), _axis_values(data, {}, "paper")
    m = {s: 100 * v.mean(axis=1) for s, v in data["ood"].items()}
    np.testing.assert_allclose(ours["ood"], np.mean(list(m.values()), axis=0))
    np.testing.assert_allclose(paper["ood"], (m["synth-v2"] + m["synth-sketch"] + m["synth-rendition"]) / 3)
    np.testing.assert_allclose(paper["adv"], (100 * data["adv"].mean(axis=1) + m["synth-a"]) / 2)
    np.testing.assert_allclose(paper["id"], ours["id"])


def test_best_so_far_counts_only_selectable_trials_in_trial_order():
    """The tuning pages' best-so-far curve: pruned, collapsed and diverged trials never raise it; trial order, not
    list order, decides the curve."""
    from grace_app.studies.search import best_so_far, late_gain

    def t(n, hm, state="complete", spread=0.5):
        return {"trial": n, "state": state, "score": hm, "hm": hm, "feature_spread": spread}

    trials = [t(3, 40.0), t(0, 30.0), t(1, 50.0, state="pruned"), t(2, 60.0, spread=0.95), t(4, 35.0),
              t(5, float("nan"))]
    assert best_so_far(trials, 0.9, "hm") == [30.0, 30.0, 30.0, 40.0, 40.0, 40.0]
    assert best_so_far([t(0, 10.0, state="pruned")], 0.9, "hm") == [None]
    # the convergence rule's gain: the last value minus the best after the first two thirds (floor(2n/3) trials)
    assert late_gain([30.0, 30.0, 30.0, 40.0, 40.0, 40.0]) == 0.0  # after 4 trials: 40
    assert late_gain([30.0, 30.0, 30.0, 30.0, 40.0, 45.0]) == 15.0
    assert late_gain([None, None, 10.0]) is None and late_gain([1.0, 2.0]) is None


def test_kendall_w_against_closed_forms_and_friedman():
    """W = 1 for identical rankings, 0 for two reversed ones; m (n-1) W equals Friedman's chi-square (scipy)."""
    import random

    from scipy import stats

    from grace_app.studies.verdicts import kendall_w

    assert kendall_w([[1, 2, 3, 4]] * 3)[0] == pytest.approx(1.0)
    assert kendall_w([[1, 2, 3, 4], [4, 3, 2, 1]])[0] == pytest.approx(0.0)
    rng = random.Random(0)
    ranks = [rng.sample(range(1, 8), 7) for _ in range(5)]
    w, p = kendall_w(ranks)
    chi2, p_f = stats.friedmanchisquare(*zip(*ranks))  # one argument per item: its ranks across the rankings
    assert 5 * 6 * w == pytest.approx(chi2) and p == pytest.approx(p_f)
    with pytest.raises(ValueError, match="without ties"):
        kendall_w([[1, 2, 3], [1.5, 1.5, 3]])

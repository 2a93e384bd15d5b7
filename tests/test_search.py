"""The tuning rules and the paired statistics of issue 22, against closed forms and constructed data."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from eval_suites.studies.search import Axis, collapsed, edge_side, parse_space, selectable, widen
from eval_suites.studies.verdicts import FAILS, HOLDS, INCONCLUSIVE, Spread, paired_bootstrap, paired_verdict


def test_parse_space_and_bad_axes_name_the_field():
    from grace_plugin.config import ConfigError

    axes = parse_space("grace", {"train.lr": {"low": 1e-4, "high": 1e-2}, "recipe.rho_mode": ["relative"]})
    assert axes[0] == Axis("train.lr", 1e-4, 1e-2) and axes[1].categorical
    for bad in ({"train.lr": {"low": 0, "high": 1}}, {"train.lr": {"low": 1, "high": 0.1}},
                {"train.lr": {"low": 1e-4}}, {"train.lr": []}, {"train.lr": {"low": 1e-4, "high": 1, "log": False}}):
        with pytest.raises(ConfigError, match="space.grace.train.lr"):
            parse_space("grace", bad)


@pytest.mark.parametrize("value,side", [(1e-4, "low"), (1.5e-4, "low"), (1.6e-4, None), (1e-3, None),
                                        (6.2e-3, None), (6.4e-3, "high"), (1e-2, "high")])
def test_edge_rule_is_the_outer_tenth_of_the_log_range(value, side):
    """On [1e-4, 1e-2] (two decades) the outer tenths end at 10^(-4 + 0.2) = 1.585e-4 and 10^(-2 - 0.2) = 6.31e-3."""
    ax = Axis("train.lr", 1e-4, 1e-2)
    assert edge_side(ax, value) == side
    assert edge_side(Axis("k", choices=("a", "b")), "a") is None


def test_widen_moves_one_side_by_a_decade():
    ax = Axis("train.lr", 1e-4, 1e-2)
    assert widen(ax, "low") == Axis("train.lr", 1e-5, 1e-2) and widen(ax, "high") == Axis("train.lr", 1e-4, 1e-1)
    # after widening, the value that triggered it is no longer at the edge
    assert edge_side(widen(ax, "high"), 8e-3) is None and edge_side(widen(ax, "low"), 1.2e-4) is None


def test_collapse_rule():
    assert collapsed(0.95, 0.9) and collapsed(0.9, 0.9) and collapsed(float("nan"), 0.9)
    assert not collapsed(0.70, 0.9) and not collapsed(None, 0.9)
    ok = {"state": "complete", "score": 30.0, "feature_spread": 0.7}
    assert selectable(ok, 0.9)
    assert not selectable(dict(ok, feature_spread=0.99), 0.9)  # collapsed: recorded, never selected
    assert not selectable(dict(ok, score=float("nan")), 0.9) and not selectable(dict(ok, state="fail"), 0.9)
    assert not selectable(dict(ok, state="pruned"), 0.9)


def test_bootstrap_interval_matches_the_normal_closed_form():
    """One seed, n images, differences with known population sd: the bootstrap distribution of the mean is close to
    N(mean, sd / sqrt(n)) (CLT), so the percentile interval is mean +- z * sd / sqrt(n)."""
    n = 400
    a = np.array([1] * 120 + [0] * 80 + [1] * 150 + [0] * 50)  # a wins 120 images, loses 80 and ties 200 ...
    b = np.array([0] * 120 + [1] * 80 + [1] * 150 + [0] * 50)
    d = 100.0 * (a - b)
    half = NormalDist().inv_cdf(0.975) * d.std() / math.sqrt(n)
    got = paired_bootstrap(["".join(map(str, a))], ["".join(map(str, b))], n_boot=20000, seed=1)
    assert got.mean == pytest.approx(10.0) and got.n == n
    assert got.lo == pytest.approx(10.0 - half, abs=0.06 * half)
    assert got.hi == pytest.approx(10.0 + half, abs=0.06 * half)


def test_bootstrap_resamples_seeds_too():
    """Every image alike within a seed, seeds differing: the interval is that of the mean over seeds."""
    rng = np.random.default_rng(0)
    per_seed = rng.normal(5.0, 4.0, size=300)  # difference in points per seed
    a = np.repeat(per_seed[:, None] / 100.0, 3, axis=1)
    b = np.zeros_like(a)
    got = paired_bootstrap(a, b, n_boot=20000, seed=2)
    half = NormalDist().inv_cdf(0.975) * per_seed.std() / math.sqrt(len(per_seed))
    assert got.lo == pytest.approx(per_seed.mean() - half, abs=0.08 * half)
    assert got.hi == pytest.approx(per_seed.mean() + half, abs=0.08 * half)


def test_verdict_rule_on_constructed_paired_data():
    better = "1" * 60 + "0" * 340
    same = "0" * 400
    wins = paired_bootstrap([better] * 3, [same] * 3, n_boot=4000)
    assert paired_verdict(wins, "greater") == HOLDS and paired_verdict(wins, "less") == FAILS
    loses = paired_bootstrap([same] * 3, [better] * 3, n_boot=4000)
    assert paired_verdict(loses, "greater") == FAILS and paired_verdict(loses, "less") == HOLDS
    mixed = "10" * 200, "01" * 200  # as many wins as losses
    tie = paired_bootstrap([mixed[0]], [mixed[1]], n_boot=4000)
    assert tie.lo < 0 < tie.hi and paired_verdict(tie, "greater") == INCONCLUSIVE
    assert paired_verdict(None) == INCONCLUSIVE
    assert paired_verdict(Spread(1.0, 0.0, 2.0), "greater") == INCONCLUSIVE  # an interval touching 0 excludes nothing

"""The tuning rules and the paired statistics of issue 22, against closed forms and constructed data."""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from grace_app.studies.search import Axis, collapsed, edge_side, parse_space, selectable, widen
from grace_app.studies.verdicts import FAILS, HOLDS, INCONCLUSIVE, Spread, paired_bootstrap, paired_verdict


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


# ------------------------------------------------------------------------------------------ the Optuna loop
class _Stub:
    """``validation_trial`` with a known landscape: score peaks at lr = ``peak``; lr above ``collapse_above`` gives a
    higher score but a collapsed model; ``interrupt_at``: the n-th call is interrupted (Ctrl-C)."""

    def __init__(self, peak=1e-3, collapse_above=None, interrupt_at=None, rungs=(), robust=True):
        self.peak, self.collapse_above, self.interrupt_at, self.calls = peak, collapse_above, interrupt_at, []
        self.robust = robust  # False: robust accuracy 0 at every point (a method like ft), so every HM is 0
        self.rungs = rungs  # steps at which the training's validation checks reach on_check

    def __call__(self, method, point, run_dir, *args, on_check=None, **kwargs):
        self.calls.append(dict(point))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        lr = point["train.lr"]
        hm = 50.0 - 10.0 * abs(math.log10(lr / self.peak))
        rob = hm if self.robust else 0.0
        for step in self.rungs:
            if on_check is not None:
                on_check(step, {"val_clean": hm, "val_robust": rob})
        spread = 0.5
        if self.collapse_above is not None and lr > self.collapse_above:
            hm, rob, spread = 80.0, 80.0 if self.robust else 0.0, 0.99
        return {"val_clean": hm, "val_robust": rob, "hm": hm if self.robust else 0.0, "mean": (hm + rob) / 2,
                "feature_spread": spread, "train_steps": 10, "cpu_seconds": 1.0, "wall_seconds": 1.0}


def _run(tmp_path, stub, monkeypatch, proto_over=None, budget=6, prune_every=0):
    from types import SimpleNamespace

    import grace_app.studies.tuning as tuning

    monkeypatch.setattr(tuning, "validation_trial", stub)
    proto = {"collapse_spread": 0.9, "startup_trials": 3, "widen_trials": 2, "max_widenings": 1, "rescore_top": 2,
             "rescore_seeds": 2, "space": {"m": {"train.lr": {"low": 1e-6, "high": 1e-2}}},
             "anchors": {"m": [{"train.lr": 3e-5}]}, **(proto_over or {})}
    cfg = tuning.TuneConfig(methods=["m"], out=tmp_path)
    method = SimpleNamespace(name="m")

    def objective_for(axes_ref):
        return tuning._objective(method, tmp_path / "trials", None, None, 40, {}, {}, "apgd-ce", 0.9, False,
                                 lambda *_: None, axes_ref)

    def run_trial(point, run_name, seed):
        return stub(method, point, run_name)

    study = tuning.open_study(tmp_path, "m", 0, proto["startup_trials"], prune_every)
    return tuning._tune_method("m", study, proto, cfg, budget, objective_for, run_trial, lambda *_: None)


def test_tuner_runs_the_budget_from_its_anchor_and_rescores(tmp_path, monkeypatch):
    stub = _Stub(peak=1e-4)
    res = _run(tmp_path, stub, monkeypatch)
    assert res["compute"]["trials"] == 6 and res["trials"][0]["point"] == {"train.lr": 3e-5}  # the anchor first
    assert res["trials"][0]["anchor"] is True and not any(r["anchor"] for r in res["trials"][1:])
    assert all(1e-6 <= r["point"]["train.lr"] <= 1e-2 for r in res["trials"])
    assert res["compute"]["cpu_seconds"] == 6.0 and res["compute"]["trial_steps"] == 60
    assert len(res["rescored"]) == 2 and len(stub.calls) == 6 + 2  # the top 2 trained on one more seed
    for r in res["rescored"]:  # each seed's validation result kept (the stub scores a point the same on any seed)
        row = next(t for t in res["trials"] if t["trial"] == r["trial"])
        assert sorted(r["seed_results"]) == [0, 1]
        assert all(v["hm"] == row["hm"] and v["val_clean"] == row["val_clean"] for v in r["seed_results"].values())
    best = max(res["trials"], key=lambda r: r["score"])
    assert res["selected"] == best["trial"] and res["at_range_edge"] == []


def test_a_method_without_robustness_is_tuned_on_its_clean_accuracy(tmp_path, monkeypatch):
    """Robust accuracy 0 everywhere (HM 0 for every trial): the value Optuna sees still orders trials by their clean
    accuracy (HM + 1e-4 x mean), so the sampler and the pruner have a signal and the best clean trial is selected."""
    import optuna

    from grace_app.studies.tuning import TIE_WEIGHT

    res = _run(tmp_path, _Stub(peak=1e-4, robust=False), monkeypatch)
    rows = res["trials"]
    assert all(r["hm"] == 0.0 for r in rows)
    chosen = next(r for r in rows if r["trial"] == res["selected"])
    assert chosen["val_clean"] == max(r["val_clean"] for r in rows)
    study = optuna.load_study(study_name="m", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal"))))
    for t in study.trials:
        assert t.value == pytest.approx(TIE_WEIGHT * t.user_attrs["val_clean"] / 2)


class _BrokenAbove(_Stub):
    """No robustness at any sound lr (robust 0, clean peaks at 1e-4); above lr 1e-3 the run is broken: clean 10,
    robust 7 (chance-like), so its HM (8.2) beats every sound run's HM of 0."""

    def __call__(self, method, point, run_dir, *args, on_check=None, **kwargs):
        res = super().__call__(method, point, run_dir, *args, on_check=on_check, **kwargs)
        if point["train.lr"] > 1e-3:
            res.update(val_clean=10.0, val_robust=7.0, hm=2 * 10 * 7 / 17, mean=8.5)
        return res


@pytest.mark.parametrize("score", ["hm", "clean"])
def test_a_generalisation_baseline_is_selected_on_clean_accuracy(tmp_path, monkeypatch, score):
    """tuning.yaml ``score: clean`` selects the best sound run of a method without robustness; under HM the broken
    run would win (the reason the generalisation baselines are scored on clean top-1)."""
    res = _run(tmp_path, _BrokenAbove(peak=1e-4, robust=False), monkeypatch,
               {"score": {"m": score}, "anchors": {"m": [{"train.lr": 3e-5}, {"train.lr": 5e-3}]}})
    chosen = next(r for r in res["trials"] if r["trial"] == res["selected"])
    assert res["score"] == score
    if score == "clean":
        assert chosen["point"]["train.lr"] <= 1e-3 and chosen["val_clean"] == max(r["val_clean"] for r in res["trials"])
    else:
        assert chosen["point"]["train.lr"] > 1e-3 and chosen["val_clean"] == 10.0


def test_a_study_refuses_a_changed_score(tmp_path, monkeypatch):
    from grace_plugin.config import ConfigError

    _run(tmp_path, _Stub(peak=1e-4), monkeypatch, budget=2)
    with pytest.raises(ConfigError, match="score.m"):
        _run(tmp_path, _Stub(peak=1e-4), monkeypatch, {"score": {"m": "clean"}}, budget=2)


def test_edge_rule_widens_the_range_and_goes_on(tmp_path, monkeypatch):
    """The optimum (lr 1e-1) lies outside [1e-6, 1e-2]: the selection lands in the upper tenth, the range is widened
    to 1e-1 and the search goes on for widen_trials more trials."""
    res = _run(tmp_path, _Stub(peak=1e-1), monkeypatch, {"startup_trials": 2})
    assert res["widenings"] == 1 and res["space"]["train.lr"] == {"low": 1e-6, "high": 1e-1, "log": True}
    assert res["compute"]["trials"] == 6 + 2


class _Rising(_Stub):
    """Every trial scores higher than the last: the best-so-far never stops rising."""

    def __call__(self, *args, **kwargs):
        res = super().__call__(*args, **kwargs)
        return {**res, "val_clean": 10.0 + len(self.calls), "val_robust": 10.0 + len(self.calls),
                "hm": 10.0 + len(self.calls)}


def test_convergence_rule_extends_a_budget_that_still_improves(tmp_path, monkeypatch):
    """A best-so-far that still rises by more than converge_delta over the last third gets converge_trials more
    trials, at most max_extensions times; a flat one (the default stub's landscape around its anchor) converges."""
    rule = {"converge_delta": 0.5, "converge_trials": 3, "max_extensions": 2, "rescore_top": 1, "max_widenings": 0}
    res = _run(tmp_path / "rising", _Rising(peak=1e-4), monkeypatch, rule)
    assert res["extensions"] == 2 and res["compute"]["trials"] == 6 + 2 * 3
    flat = _Stub(peak=1e-4)
    flat.__class__ = type("Flat", (_Stub,), {"__call__": lambda self, *a, **k: {**_Stub.__call__(self, *a, **k),
                                                                                   "hm": 40.0}})
    res = _run(tmp_path / "flat", flat, monkeypatch, rule)
    assert res["extensions"] == 0 and res["compute"]["trials"] == 6


def test_collapse_rule_in_the_loop(tmp_path, monkeypatch):
    """Trials above lr 1e-4 score 80 but are collapsed: recorded, counted, never selected."""
    res = _run(tmp_path, _Stub(peak=1e-5, collapse_above=1e-4), monkeypatch)
    assert res["collapsed"] >= 1
    chosen = next(r for r in res["trials"] if r["trial"] == res["selected"])
    assert not chosen["collapsed"] and chosen["feature_spread"] < 0.9


def test_successive_halving_prunes_weak_trials_on_the_step_axis(tmp_path, monkeypatch):
    """Validation checks at steps 10, 20, 30 of 40 reach the pruner: trials whose validation HM is in the lower part
    at a rung are pruned there (recorded, counted, never selected); the selected one trained to the end."""
    res = _run(tmp_path, _Stub(peak=1e-4, rungs=(10, 20, 30)), monkeypatch,
               {"startup_trials": 12, "rescore_top": 0}, budget=12, prune_every=10)
    states = [r["state"] for r in res["trials"]]
    assert len(states) == 12 and "pruned" in states and "complete" in states
    chosen = next(r for r in res["trials"] if r["trial"] == res["selected"])
    assert chosen["state"] == "complete" and chosen["score"] == max(r["score"] for r in res["trials"]
                                                                    if r["state"] == "complete")
    pruned = [r for r in res["trials"] if r["state"] == "pruned"]
    assert all(r["train_steps"] == r["pruned_at"] in (10, 20, 30) and r["cpu_seconds"] is not None for r in pruned)
    assert res["compute"]["trial_steps"] == 10 * (12 - len(pruned)) + sum(r["pruned_at"] for r in pruned)


def test_a_worker_waits_only_for_live_trials_of_other_workers(tmp_path):
    """Trials another live worker runs count towards the budget; this process's own, a dead process's and one
    running far longer than any finished trial do not (a lost worker never hangs the others)."""
    import datetime
    import os
    import socket
    import subprocess
    import sys

    import grace_app.studies.tuning as tuning

    study = tuning.open_study(tmp_path, "m", 0, 3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (os.getppid(), os.getpid(), dead.pid):
        t = study.ask()
        t.set_user_attr("host", socket.gethostname())
        t.set_user_attr("pid", pid)
    assert tuning._running_elsewhere(study) == 1  # the parent process's trial only
    other = study.ask()
    other.set_user_attr("host", "another-node")
    other.set_user_attr("pid", 1)
    assert tuning._running_elsewhere(study) == 2  # no trial finished yet: nothing is too old to wait for
    done = study.ask()
    study.tell(done, 1.0)
    finished = study.get_trials()[-1]
    limit = 3 * (finished.datetime_complete - finished.datetime_start).total_seconds()
    later = datetime.datetime.now() + datetime.timedelta(seconds=limit + 5)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return later

    import unittest.mock

    with unittest.mock.patch("datetime.datetime", Clock):
        assert tuning._running_elsewhere(study) == 0  # both have run 3x longer than any finished trial


def test_killed_tune_resumes_without_redoing_finished_trials(tmp_path, monkeypatch):
    """The third trial is interrupted: the rerun does not redo the two finished ones, redoes the interrupted point
    first, and ends with exactly the budget counted."""
    first = _Stub(peak=1e-4, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, first, monkeypatch)
    done, interrupted = first.calls[:2], first.calls[2]
    again = _Stub(peak=1e-4)
    res = _run(tmp_path, again, monkeypatch)
    assert again.calls[0] == interrupted and not any(c in again.calls[1:4] for c in done)
    assert len(again.calls) == 4 + 2  # 4 trials left of 6, then the re-scoring of the top 2
    assert res["compute"]["trials"] == 6


def test_a_trial_left_running_by_a_dead_process_is_redone(tmp_path, monkeypatch):
    """SIGKILL leaves a RUNNING trial in the journal; a new process marks it failed (not counted) and queues its
    point."""
    import subprocess
    import sys

    import grace_app.studies.tuning as tuning

    study = tuning.open_study(tmp_path, "m", 0, 3)
    t = study.ask()
    t.suggest_float("train.lr", 1e-6, 1e-2, log=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t.set_user_attr("host", __import__("socket").gethostname())
    t.set_user_attr("pid", dead.pid)
    assert tuning._reclaim_killed(study) == 1
    assert [s.state.name for s in study.get_trials()] == ["FAIL", "WAITING"]
    assert study.get_trials()[1].system_attrs["fixed_params"] == t.params  # Optuna keeps an enqueued point there
    assert tuning._reclaim_killed(study) == 0  # queued once


# ------------------------------------------------------------------------------------------ paired claims
def _row(adv_hits: int, seeds=(0, 1, 2), id_hits: int = 300, shift: int = 0):
    """A row's Spread for each axis with per-sample results: ID 400 images, two OOD sets of 200, Adv 300."""
    from grace_app.studies.verdicts import spread

    def bits(k, n, off=0):
        return "".join("1" if (i + off) % n < k else "0" for i in range(n))

    samples = tuple((s, {"id": bits(id_hits, 400), "ood": {"v2": bits(100, 200), "a": bits(50, 200)},
                         "adv": bits(adv_hits, 300, shift)}) for s in seeds)
    axes = {"id": 100 * id_hits / 400, "ood": (50 + 25) / 2, "adv": 100 * adv_hits / 300}
    axes["hm"] = 3 / sum(1 / v for v in axes.values())
    return {k: __import__("dataclasses").replace(spread([v] * len(seeds), seeds=list(seeds)), samples=samples)
            for k, v in axes.items()}


def test_claims_are_decided_on_paired_per_sample_bootstraps():
    from grace_app.studies.verdicts import evaluate_claim, paired_samples_bootstrap

    rows = {"grace": _row(120), "tecoa": _row(60)}  # GRACE robust on 60 more of the 300 attacked images
    d = paired_samples_bootstrap(rows["grace"]["adv"], rows["tecoa"]["adv"], "adv")
    assert d.mean == pytest.approx(20.0) and 0 < d.lo < 20 < d.hi and d.kind == "paired bootstrap 95%"
    v = evaluate_claim({"claim": "c", "kind": "greater", "a": "grace", "b": "tecoa", "metric": "adv"}, rows)
    assert v["verdict"] == HOLDS and "95% bootstrap" in v["evidence"] and v["parts"][0]["paired"]["n"] == 3
    assert evaluate_claim({"claim": "c", "kind": "less", "a": "grace", "b": "tecoa", "metric": "adv"},
                          rows)["verdict"] == FAILS
    # identical ID results: a difference of exactly 0 excludes nothing
    assert evaluate_claim({"claim": "c", "kind": "greater", "a": "grace", "b": "tecoa", "metric": "id"},
                          rows)["verdict"] == INCONCLUSIVE
    # a margin larger than the difference turns the claim around
    assert evaluate_claim({"claim": "c", "kind": "greater", "a": "grace", "b": "tecoa", "metric": "adv",
                           "margin": 40.0}, rows)["verdict"] == FAILS
    # HM: the point estimate is the mean over seeds of the per-seed HM difference (closed form here)
    h = paired_samples_bootstrap(rows["grace"]["hm"], rows["tecoa"]["hm"], "hm", n_boot=200)
    assert h.mean == pytest.approx(rows["grace"]["hm"].mean - rows["tecoa"]["hm"].mean)


def test_claims_without_per_sample_results_fall_back_to_the_seeds_then_to_spreads():
    from dataclasses import replace

    from grace_app.studies.verdicts import evaluate_claim

    claim = {"claim": "c", "kind": "greater", "a": "grace", "b": "tecoa", "metric": "adv"}
    rows = {m: {k: replace(v, samples=()) for k, v in _row(a).items()} for m, a in (("grace", 120), ("tecoa", 60))}
    v = evaluate_claim(claim, rows)  # per-seed values on 3 common seeds: the paired t interval over them
    assert v["parts"][0]["paired"]["interval_kind"] == "paired t 95%" and v["parts"][0]["paired"]["n"] == 3
    assert v["parts"][0]["paired"]["mean"] == pytest.approx(20.0) and v["verdict"] == "holds"
    rows = {m: {k: replace(s, by_seed=()) for k, s in r.items()} for m, r in rows.items()}
    v = evaluate_claim(claim, rows)  # nothing to pair
    assert "by spreads" in v["evidence"] and "paired" not in v["parts"][0]

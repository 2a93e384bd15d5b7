"""The shift study's table (grace_app/studies/shift_table.py) on constructed runs: means, stds, near/far, rho."""
import math

import pytest

from grace_app.studies.shift_table import aggregate_shift, shift_markdown, shift_record


def _suite(drops: dict, dist: dict, id_acc: float = 80.0) -> dict:
    """A shift suite result (eval_suites/suites.py, suite ``shift``) with the given drops and image distances."""
    return {"kind": "shift", "n": 10, "id_acc": id_acc, "acc": {k: id_acc - v for k, v in drops.items()},
            "accuracy_drop": drops,
            "spaces": {"image": {"scores": dist, "id_self": 1.0, "spearman": 1.0},
                       "joint": {"scores": {k: 2 * v for k, v in dist.items()}, "id_self": 2.0, "spearman": 0.5}}}


def test_aggregate_is_the_mean_and_sample_std_over_seeds_and_splits_at_the_largest_gap():
    runs = [{"seed": 0, "shift": shift_record(_suite({"v2": 10.0, "a": 30.0, "sketch": 20.0},
                                                     {"v2": 1.0, "a": 5.0, "sketch": 2.0}))},
            {"seed": 1, "shift": shift_record(_suite({"v2": 20.0, "a": 40.0, "sketch": 20.0},
                                                     {"v2": 1.2, "a": 5.4, "sketch": 2.2}))}]
    agg = aggregate_shift(runs)
    assert agg["drop"] == {"v2": 15.0, "a": 35.0, "sketch": 20.0}
    assert agg["drop_std"]["v2"] == pytest.approx(math.sqrt(50.0))  # (10 - 15)^2 + (20 - 15)^2 over n - 1 = 1
    assert agg["drop_std"]["sketch"] == 0.0
    assert agg["distance"]["image"] == pytest.approx({"v2": 1.1, "a": 5.2, "sketch": 2.1})
    assert agg["distance"]["joint"]["a"] == pytest.approx(10.4)
    # gaps 1.0 (v2 -> sketch) and 3.1 (sketch -> a): a alone is far
    assert agg["split"] == {"order": ["v2", "sketch", "a"], "near": ["v2", "sketch"], "far": ["a"]}
    assert agg["spearman"] == {"image": 1.0, "joint": 0.5}


def test_markdown_orders_sets_by_the_pre_trained_distance_and_ranks_each_methods_drops():
    ref = [{"seed": 0, "shift": shift_record(_suite({"v2": 5.0, "a": 30.0, "sketch": 10.0},
                                                    {"v2": 1.0, "a": 4.0, "sketch": 2.0}))}]
    # a method whose drops run against the pre-trained distance: rho = -1
    other = [{"seed": 0, "shift": shift_record(_suite({"v2": 30.0, "a": 5.0, "sketch": 10.0},
                                                      {"v2": 3.0, "a": 1.0, "sketch": 2.0}))}]
    rows = {"zero-shot": {"label": "zero-shot", "runs": ref, "shift": aggregate_shift(ref)},
            "ft": {"label": "ft", "runs": other, "shift": aggregate_shift(other)}}
    md = "\n".join(shift_markdown(rows))
    table = [line for line in md.splitlines() if line.startswith("| v2 ") or line.startswith("| sketch ")
             or line.startswith("| a ")]
    assert [line.split(" |")[0] for line in table] == ["| v2", "| sketch", "| a"]  # near -> far
    assert "| a | 4.000 | far | 30.00 | 5.00 |" in md
    assert "| rho (pre-trained distance, drop) | | | 1.00 | -1.00 |" in md
    assert shift_markdown({"ft": {"label": "ft", "runs": []}}) == []  # no shift results: no section


def test_paired_drops_from_the_reference_are_paired_by_seed_with_a_t_interval():
    """Each row's drop minus the reference's, paired by seed over the seeds both ran (seed 2 only in one row is
    left out), against scipy's t interval of the same differences; the section names the reference."""
    import statistics

    from scipy import stats

    from grace_app.studies.shift_table import paired_drops

    def runs(per_seed):  # {seed: (id_acc, drop on v2, drop on a)}
        return [{"seed": s, "shift": shift_record(_suite({"v2": v2, "a": a}, {"v2": 1.0, "a": 4.0}, id_acc=i))}
                for s, (i, v2, a) in per_seed.items()]

    ref = runs({0: (70.0, 10.0, 40.0), 1: (72.0, 12.0, 44.0), 2: (71.0, 11.0, 42.0)})
    row = runs({0: (60.0, 4.0, 30.0), 1: (61.0, 9.0, 31.0), 3: (50.0, 1.0, 1.0)})
    rows = {"grace": {"label": "GRACE", "runs": ref, "shift": aggregate_shift(ref)},
            "lora": {"label": "LoRA", "runs": row, "shift": aggregate_shift(row)}}
    got = paired_drops(rows, "grace")
    assert list(got) == ["lora"]
    expected = {"id": [60.0 - 70.0, 61.0 - 72.0], "v2": [4.0 - 10.0, 9.0 - 12.0], "a": [30.0 - 40.0, 31.0 - 44.0]}
    for key, d in expected.items():
        lo, hi = stats.t.interval(0.95, len(d) - 1, loc=statistics.fmean(d), scale=stats.sem(d))
        assert got["lora"][key].n == 2 and got["lora"][key].mean == pytest.approx(statistics.fmean(d))
        assert (got["lora"][key].lo, got["lora"][key].hi) == pytest.approx((lo, hi))
    md = "\n".join(shift_markdown(rows, "grace"))
    assert "against GRACE's, paired by seed" in md and "| LoRA | 2 | -10.50 [" in md
    assert "paired by seed" not in "\n".join(shift_markdown(rows))  # no reference: no paired table
    assert paired_drops(rows, "missing") == {}

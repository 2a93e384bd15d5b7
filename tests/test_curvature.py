import numpy as np
import pytest
import torch

from grace_plugin.curvature import allocate_ranks, ema_update, layer_curvature


def test_layer_curvature_formula():
    g = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    assert layer_curvature(g, 8) == pytest.approx(8 * (1 + 4 + 0.25 + 0) / 4)


def test_ema_first_value_then_blend():
    s = ema_update({}, {"a": 2.0}, 0.9)
    assert s == {"a": 2.0}
    s = ema_update(s, {"a": 12.0}, 0.9)
    assert s["a"] == pytest.approx(0.9 * 2 + 0.1 * 12)


def test_allocate_ranks_percentile_rule():
    rng = np.random.default_rng(0)
    curv = {f"l{i}": float(v) for i, v in enumerate(rng.exponential(size=10))}
    ranks = allocate_ranks(curv, (20, 80), (0, 2, 4))
    vals = sorted(curv.values())
    lo, hi = np.percentile(vals, 20), np.percentile(vals, 80)
    for n, v in curv.items():
        assert ranks[n] == (4 if v >= hi else 0 if v < lo else 2)
    # with 10 distinct layers: the 2 sharpest get r_max, the 2 flattest get 0
    order = sorted(curv, key=curv.get)
    assert [ranks[n] for n in order] == [0, 0, 2, 2, 2, 2, 2, 2, 4, 4]

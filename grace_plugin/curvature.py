"""GRACE's curvature curriculum (GRACE, arXiv 2603.27139, Appendix E.1 Eqs. 28-29,
as quoted by github.com/amashkk/grace).

Per adapted weight matrix W: ``ĥ_W = n_v (g_W ⊙ g_W)`` (diagonal Gauss-Newton / empirical-Fisher proxy),
``h̄_W = mean(ĥ_W)``, EMA ``h_W ← β h_W + (1-β) h̄_W`` (first update: ``h_W ← h̄_W``), and a rank per layer from
the percentiles of ``{h_W}`` over layers: ``>= hi`` percentile -> ``levels[2]`` (r_max), between -> ``levels[1]``,
``< lo`` -> ``levels[0]`` (0). Pure functions; the recipe supplies the gradients.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["layer_curvature", "ema_update", "allocate_ranks"]


def layer_curvature(grad: torch.Tensor, n_samples: int) -> float:
    """``mean(n_v * g ⊙ g)`` for one weight's gradient ``g`` of the mean loss over ``n_v`` samples (Eq. 28)."""
    g = grad.detach().float()
    return float(n_samples * (g * g).mean())


def ema_update(state: dict[str, float], fresh: dict[str, float], beta: float) -> dict[str, float]:
    """Eq. 29; a layer seen for the first time starts at its fresh value."""
    return {k: (beta * state[k] + (1 - beta) * v) if k in state else v for k, v in fresh.items()}


def allocate_ranks(curv: dict[str, float], percentiles: tuple[float, float] = (20.0, 80.0),
                   levels: tuple[int, int, int] = (0, 2, 4)) -> dict[str, int]:
    """Percentile rule: top band (>= hi pct) gets levels[2], bottom band (< lo pct) levels[0], the rest levels[1]."""
    if not curv:
        return {}
    names = list(curv)
    vals = np.array([curv[n] for n in names], dtype=np.float64)
    lo, hi = np.percentile(vals, percentiles[0]), np.percentile(vals, percentiles[1])
    out = {}
    for n, v in zip(names, vals):
        out[n] = levels[2] if v >= hi else (levels[0] if v < lo else levels[1])
    return out

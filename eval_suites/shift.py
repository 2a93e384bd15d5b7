"""Shift quantification by Mahalanobis distance (FRAMES-VQA, arXiv 2505.21755), for image classification.

FRAMES' procedure is in github.com/chengyuehuang511/vlm_robustness, ``ood_test/contextual_ood/measure.py``.

Fit a single Gaussian on the ID embeddings (mean, unbiased covariance, float64), invert with a pseudo-inverse of
``Sigma + ridge I``, and score each sample of another set by ``sqrt((z - mu)^T Sigma^+ (z - mu))``; a set's shift is
the mean over its samples (FRAMES reports the negative of it). Three embeddings, our transfer of FRAMES'
VQA modalities to image classification: ``image`` (the model's L2-normalised image embedding), ``text`` (the
class-prompt text embedding the model's prediction points at, ``softmax(logits) @ W`` with ``W`` the zero-shot
head's prompt embeddings) and ``joint`` (their concatenation, so cross-modal covariance counts). Sets are ordered
near -> far and the distances are correlated (Pearson, Spearman) with the accuracy drop from ID.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GaussianFit", "fit_gaussian", "mahalanobis", "set_shift", "near_far", "pearson", "spearman",
           "shift_summary"]


@dataclass
class GaussianFit:
    mean: np.ndarray
    precision: np.ndarray
    ridge: float


def fit_gaussian(z: np.ndarray, ridge: float | None = None) -> GaussianFit:
    """Mean and pseudo-inverse of ``Sigma + ridge I`` in float64. FRAMES' measure.py uses ridge 1e-8; our default
    is ``1e-6 * tr(Sigma) / d`` (scale-aware) and is a config field of the suite."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"need at least 2 ID embeddings of shape [n, d], got {z.shape}")
    mu = z.mean(0)
    cov = np.cov(z, rowvar=False, ddof=1).reshape(z.shape[1], z.shape[1])
    if ridge is None:
        ridge = 1e-6 * float(np.trace(cov)) / z.shape[1]
    prec = np.linalg.pinv(cov + ridge * np.eye(z.shape[1]), hermitian=True)
    return GaussianFit(mu, prec, float(ridge))


def mahalanobis(z: np.ndarray, fit: GaussianFit) -> np.ndarray:
    """Per-sample Mahalanobis distance to the fitted ID Gaussian."""
    dz = np.asarray(z, dtype=np.float64) - fit.mean
    return np.sqrt(np.clip(np.einsum("nd,de,ne->n", dz, fit.precision, dz), 0.0, None))


def set_shift(z: np.ndarray, fit: GaussianFit) -> float:
    return float(mahalanobis(z, fit).mean())


def near_far(scores: dict[str, float]) -> dict:
    """Order sets by distance; split near/far at the largest gap between consecutive distances."""
    order = sorted(scores, key=lambda k: scores[k])
    if len(order) < 2:
        return {"order": order, "near": order, "far": []}
    vals = [scores[k] for k in order]
    cut = max(range(1, len(vals)), key=lambda i: vals[i] - vals[i - 1])
    return {"order": order, "near": order[:cut], "far": order[cut:]}


def _correlation(stat, x, y) -> float | None:
    """``scipy.stats`` correlation ``stat`` of two sequences; None where it is undefined (< 2 points, constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    # constant to the last few bits (e.g. one question text asked of a whole set) counts as constant
    if len(x) < 2 or np.allclose(x, x[0], rtol=1e-12, atol=0) or np.allclose(y, y[0], rtol=1e-12, atol=0):
        return None
    return float(stat(x, y)[0])


def pearson(x, y) -> float | None:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, x, y)


def spearman(x, y) -> float | None:
    """Spearman's rho: Pearson on average ranks (ties share their mean rank)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, x, y)


def shift_summary(id_emb: dict[str, np.ndarray], sets: dict[str, dict[str, np.ndarray]],
                  accuracy_drop: dict[str, float] | None = None, ridge: float | None = None) -> dict:
    """``id_emb``: ``{space: [n, d]}``; ``sets``: ``{set: {space: [m, d]}}``; ``accuracy_drop``: ``{set: ID - set}``.

    Returns ``{space: {"scores": {set: mean distance}, "id_self": mean ID distance, "ridge", "order", "near",
    "far", "pearson", "spearman"}}``.
    """
    out = {}
    for space, z in id_emb.items():
        fit = fit_gaussian(z, ridge)
        scores = {name: set_shift(e[space], fit) for name, e in sets.items()}
        entry = {"scores": scores, "id_self": set_shift(z, fit), "ridge": fit.ridge, **near_far(scores)}
        if accuracy_drop:
            names = [n for n in scores if accuracy_drop.get(n) is not None]
            xs, ys = [scores[n] for n in names], [accuracy_drop[n] for n in names]
            entry.update(pearson=pearson(xs, ys), spearman=spearman(xs, ys))
        out[space] = entry
    return out

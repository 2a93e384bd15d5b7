"""Geometry of a fine-tuned model (GRACE, arXiv 2603.27139: Tables 2-3 and Fig. 7), as pure functions.

Curvature of the loss w.r.t. a list of parameters, from Hessian-vector products (double backward; PyHessian,
https://arxiv.org/abs/1912.07145): the top eigenvalue by power iteration, the Hutchinson trace, the normalised
Frobenius norm ``||H||_F / sqrt(d)`` and the layer-wise normalised curvature ``Tr(H_l) / |theta_l|``. Feature
geometry: class-centroid cosine between two embedding sets, MLE local intrinsic dimensionality (Levina & Bickel
2004; Ma et al. 2018) and its shift ``dLID = LID(shift) - LID(ID)``; and the relative parameter drift
``||theta - theta_0|| / ||theta_0||``.

PyHessian itself is not a dependency (it pins old torch and is a thin loop over ``torch.autograd.grad``); the HVP
below is the same 10 lines.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from grace_plugin.weightspace import relative_drift  # noqa: F401  (re-exported: the one definition)

__all__ = ["hvp", "power_iteration", "top_hessian_eigenvalue", "hutchinson_trace", "hessian_frobenius_normalised",
           "layerwise_curvature", "class_centroid_cosine", "lid_mle", "delta_lid", "relative_drift"]

LossFn = Callable[[], torch.Tensor]


def _grads(loss_fn: LossFn, params: Sequence[torch.Tensor]):
    loss = loss_fn()
    return torch.autograd.grad(loss, params, create_graph=True)


def hvp(loss_fn: LossFn, params: Sequence[torch.Tensor], v: Sequence[torch.Tensor], grads=None) -> list[torch.Tensor]:
    """``H v`` for the Hessian of ``loss_fn()`` w.r.t. ``params`` (``v`` shaped like ``params``)."""
    g = grads if grads is not None else _grads(loss_fn, params)
    out = torch.autograd.grad(g, params, grad_outputs=list(v), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if o is None else o.detach() for p, o in zip(params, out)]


def _dot(a, b) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _rademacher(params, gen: torch.Generator):
    return [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int64) * 2 - 1).to(p) for p in params]


def power_iteration(loss_fn: LossFn, params: Sequence[torch.Tensor], iters: int = 50, tol: float = 1e-4,
                    seed: int = 0) -> dict:
    """Largest-magnitude Hessian eigenvalue by power iteration on HVPs (PyHessian's ``eigenvalues(top_n=1)``), with
    its convergence: ``{"eigenvalue", "iterations", "rel_change", "tol", "converged"}``; it stops when the Rayleigh
    quotient changes by at most ``tol`` relative between two iterations (``rel_change``: the last such change)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(params)
    g = _grads(loss_fn, params)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    norm = torch.sqrt(_dot(v, v))
    v = [x / norm for x in v]
    eig, change, n = None, None, 0
    for n in range(1, iters + 1):
        hv = hvp(loss_fn, params, v, grads=g)
        new = float(_dot(v, hv))
        norm = torch.sqrt(_dot(hv, hv))
        if norm == 0:
            return {"eigenvalue": 0.0, "iterations": n, "rel_change": 0.0, "tol": tol, "converged": True}
        v = [x / norm for x in hv]
        if eig is not None:
            change = abs(new - eig) / (abs(eig) + 1e-12)
        eig = new
        if change is not None and change <= tol:
            break
    return {"eigenvalue": float(eig), "iterations": n, "rel_change": change, "tol": tol,
            "converged": change is not None and change <= tol}


def top_hessian_eigenvalue(loss_fn: LossFn, params: Sequence[torch.Tensor], iters: int = 50, tol: float = 1e-4,
                           seed: int = 0) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on HVPs (``power_iteration``'s value)."""
    return power_iteration(loss_fn, params, iters, tol, seed)["eigenvalue"]


def hutchinson_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], n_samples: int = 64, seed: int = 0) -> float:
    """``Tr(H) = E[v^T H v]`` with Rademacher ``v`` (Hutchinson 1989)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(params)
    g = _grads(loss_fn, params)
    total = 0.0
    for _ in range(n_samples):
        v = _rademacher(params, gen)
        total += float(_dot(v, hvp(loss_fn, params, v, grads=g)))
    return total / n_samples


def hessian_frobenius_normalised(loss_fn: LossFn, params: Sequence[torch.Tensor], n_samples: int = 64,
                                 seed: int = 0) -> float:
    """``||H||_F / sqrt(d)`` with ``||H||_F^2 = E||H v||^2`` for Rademacher ``v`` (Table 3's metric;
    Hutchinson estimator as in PyHessian, arXiv 1912.07145)."""
    gen = torch.Generator().manual_seed(seed)
    params = list(params)
    d = sum(p.numel() for p in params)
    g = _grads(loss_fn, params)
    total = 0.0
    for _ in range(n_samples):
        hv = hvp(loss_fn, params, _rademacher(params, gen), grads=g)
        total += float(_dot(hv, hv))
    return (total / n_samples) ** 0.5 / d ** 0.5


def layerwise_curvature(loss_fn: LossFn, named_params: Mapping[str, Sequence[torch.Tensor]], n_samples: int = 16,
                        seed: int = 0) -> dict[str, float]:
    """``{layer: Tr(H_ll) / |theta_l|}``: Hutchinson restricted to each layer's block (v zero elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    groups = {k: list(v) for k, v in named_params.items()}
    params = [p for ps in groups.values() for p in ps]
    g = _grads(loss_fn, params)
    out = {}
    for name, ps in groups.items():
        ids = {id(p) for p in ps}
        n = sum(p.numel() for p in ps)
        total = 0.0
        for _ in range(n_samples):
            v = [(_rademacher([p], gen)[0] if id(p) in ids else torch.zeros_like(p)) for p in params]
            total += float(_dot(v, hvp(loss_fn, params, v, grads=g)))
        out[name] = total / n_samples / n
    return out


def class_centroid_cosine(a: torch.Tensor, ya: torch.Tensor, b: torch.Tensor, yb: torch.Tensor) -> float | None:
    """Mean over classes present in both sets of cos(centroid of normalised ``a``, centroid of normalised ``b``)."""
    a, b = F.normalize(a.double(), dim=-1), F.normalize(b.double(), dim=-1)
    common = sorted(set(ya.tolist()) & set(yb.tolist()))
    if not common:
        return None
    cos = [float(F.cosine_similarity(a[ya == c].mean(0), b[yb == c].mean(0), dim=0)) for c in common]
    return sum(cos) / len(cos)


def lid_mle(x: torch.Tensor, k: int = 20) -> float:
    """Mean MLE local intrinsic dimensionality over the points of ``x`` (k nearest neighbours within ``x``):
    ``LID(x) = -( (1/k) sum_i log(r_i / r_k) )^{-1}`` (Levina & Bickel 2004; Ma et al. 2018)."""
    x = x.double()
    if x.shape[0] <= k:
        raise ValueError(f"LID with k={k} needs more than {k} points, got {x.shape[0]}")
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    r = d.topk(k, dim=1, largest=False).values  # ascending distances r_1..r_k
    r = r.clamp_min(1e-12)
    lid = -1.0 / torch.log(r / r[:, -1:]).mean(dim=1)
    return float(lid.mean())


def delta_lid(id_emb: torch.Tensor, shift_emb: torch.Tensor, k: int = 20) -> float:
    """``LID(shift) - LID(ID)`` (arXiv 2603.27139 Table 2 reports GRACE <= 2.5, FT > 8)."""
    return lid_mle(shift_emb, k) - lid_mle(id_emb, k)

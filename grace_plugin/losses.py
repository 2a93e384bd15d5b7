"""Loss terms and feature statistics as pure tensor functions (tensors in, tensor out), unit-tested against closed
forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_volume", "pairwise_cosines", "feature_spread", "feature_sums", "spread_from_sums",
           "gradient_shares"]


def _det(g: torch.Tensor) -> torch.Tensor:
    """Determinant of a batch of 2x2 or 3x3 matrices by cofactor expansion (cheaper than an LU per sample)."""
    if g.shape[-1] == 2:
        return g[:, 0, 0] * g[:, 1, 1] - g[:, 0, 1] * g[:, 1, 0]
    return (g[:, 0, 0] * (g[:, 1, 1] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 1])
            - g[:, 0, 1] * (g[:, 1, 0] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 0])
            + g[:, 0, 2] * (g[:, 1, 0] * g[:, 2, 1] - g[:, 1, 1] * g[:, 2, 0]))


def gram_volume(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample volume ``sqrt(det(G + eps I))`` of the parallelotope spanned by three (or two) embeddings.

    GRACE (arXiv 2603.27139) Eqs. 8-9: ``G_i = [<f_j, f_k>]`` for ``j, k in {ID, Adv, AWP}``. Inputs ``[B, D]`` are
    L2-normalised here. For unit vectors with pairwise cosines a, b, c and eps = 0: ``det G = 1 + 2abc - a^2 - b^2
    - c^2``; with ``f3=None`` it is the area of the two-vector parallelogram, ``sqrt((1+eps)^2 - a^2)`` (= |sin| of
    the angle at eps = 0): the GRAM volume for k = 2 (Cicchetti et al., arXiv 2412.11959), used without an AWP view.

    Numerics: near alignment ``det G`` is a difference of O(1) terms that is O(eps^2). In float32 it rounds to 0 or
    below, where ``sqrt`` has an infinite derivative, and ``0 * inf`` is NaN even under a zero loss weight. So the
    normalisation, ``G`` and the determinant are computed in float64 (rounding ~1e-16, far below the floor
    ``eps^k``), and the determinant is clamped at that floor, which ``G + eps I`` (eigenvalues >= eps) cannot go
    below in exact arithmetic. With ``eps > 0`` the gradient is then bounded at alignment: ``d sqrt(det) / dG =
    adj(G) / (2 sqrt(det))`` with ``adj(G) = det G^-1`` of order eps and ``sqrt(det)`` of order eps. The volume is
    returned in the inputs' (floating) dtype.
    """
    views = [f for f in (f1, f2, f3) if f is not None]
    k = len(views)
    u = torch.stack([F.normalize(f.double(), dim=-1) for f in views], dim=1)  # [B, k, D], float64
    g = u @ u.transpose(1, 2) + eps * torch.eye(k, device=u.device, dtype=u.dtype)
    floor = max(float(eps) ** k, torch.finfo(torch.float64).tiny)
    vol = _det(g).clamp_min(floor).sqrt()
    return vol.to(f1.dtype if f1.is_floating_point() else torch.float32)


def pairwise_cosines(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor) -> tuple[float, float, float]:
    """Batch-mean cosines (1,2), (1,3), (2,3): the volume is also 0 for coplanar vectors, so we log these."""
    n = [F.normalize(f.detach().float(), dim=-1) for f in (f1, f2, f3)]
    return tuple(float((a * b).sum(-1).mean()) for a, b in ((n[0], n[1]), (n[0], n[2]), (n[1], n[2])))


def gradient_shares(grads: dict[str, list]) -> dict[str, float]:
    """Each loss term's part of the step's gradient, from the per-term gradients ``{term: [g_p or None per
    parameter]}`` (the same parameter list for every term; None: the term does not reach that parameter).

    With ``g = sum_t g_t``: ``gnorm_t = ||g_t||``, ``gnorm_total = ||g||`` and ``gshare_t = <g_t, g> / ||g||^2``, the
    term's component along the step's direction, which sums to 1 over the terms (a term can be negative: it pulls
    against the others). A loss share (``lambda L / L``) says nothing of this: a term can be large and flat."""
    names = list(grads)
    n_params = len(grads[names[0]])
    dots = {t: 0.0 for t in names}
    sq = {t: 0.0 for t in names}
    total_sq = 0.0
    for i in range(n_params):
        parts = {t: grads[t][i].detach().double() for t in names if grads[t][i] is not None}
        if not parts:
            continue
        g = sum(parts.values())
        total_sq += float(g.square().sum())
        for t, gt in parts.items():
            sq[t] += float(gt.square().sum())
            dots[t] += float((gt * g).sum())
    out = {f"gnorm_{t}": sq[t] ** 0.5 for t in names}
    out["gnorm_total"] = total_sq ** 0.5
    out.update({f"gshare_{t}": (dots[t] / total_sq if total_sq > 0 else float("nan")) for t in names})
    return out


def feature_sums(f: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of the L2-normalised rows in float64, number of rows)``: what ``spread_from_sums`` needs, additive
    over batches and ranks."""
    return F.normalize(f.detach().double(), dim=-1).sum(0), int(f.shape[0])


def spread_from_sums(total: torch.Tensor, n: int) -> float | None:
    """Mean cosine between *different* rows from ``feature_sums``: ``sum_{i != j} u_i . u_j = ||sum u||^2 - n``
    over ``n (n - 1)`` ordered pairs. None for fewer than two rows."""
    if n < 2:
        return None
    return float((total.double().square().sum() - n) / (n * (n - 1)))


def feature_spread(f: torch.Tensor) -> float | None:
    """Feature spread: the mean cosine between the features of different images (rows of ``f``, ``[N, D]``).

    Near 1 the features no longer tell images apart (collapse: every input maps to about one direction); a
    pretrained CLIP sits well below. Computed from sums (``feature_sums``), so batches and ranks combine exactly."""
    return spread_from_sums(*feature_sums(f))

"""Loss terms as pure tensor functions (tensors in, tensor out), unit-tested against closed forms."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gram_volume", "pairwise_cosines"]


def gram_volume(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample volume ``sqrt(|det(G + eps I)|)`` of the parallelotope spanned by three (or two) embeddings.

    GRACE (arXiv 2603.27139) Eqs. 8-9: ``G_i = [<f_j, f_k>]`` for ``j, k in {ID, Adv, AWP}``. Inputs ``[B, D]`` are
    L2-normalised here; the determinant is expanded in closed form in fp32 (cheap, stable, differentiable).
    For unit vectors with pairwise cosines a, b, c and eps = 0: ``det G = 1 + 2abc - a^2 - b^2 - c^2``.
    With ``f3=None`` it is the area of the two-vector parallelogram, ``sqrt((1+eps)^2 - a^2)`` (= |sin| of the angle
    at eps = 0): the GRAM volume for k = 2 (Cicchetti et al., arXiv 2412.11959), used when there is no AWP view.
    """
    if f3 is None:
        a = (F.normalize(f1.float(), dim=-1) * F.normalize(f2.float(), dim=-1)).sum(-1)
        return ((1 + eps) ** 2 - a * a).abs().sqrt()
    u = torch.stack([F.normalize(f.float(), dim=-1) for f in (f1, f2, f3)], dim=1)  # [B, 3, D]
    g = u @ u.transpose(1, 2) + eps * torch.eye(3, device=u.device, dtype=u.dtype)
    det = (g[:, 0, 0] * (g[:, 1, 1] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 1])
           - g[:, 0, 1] * (g[:, 1, 0] * g[:, 2, 2] - g[:, 1, 2] * g[:, 2, 0])
           + g[:, 0, 2] * (g[:, 1, 0] * g[:, 2, 1] - g[:, 1, 1] * g[:, 2, 0]))
    return det.abs().sqrt()


def pairwise_cosines(f1: torch.Tensor, f2: torch.Tensor, f3: torch.Tensor) -> tuple[float, float, float]:
    """Batch-mean cosines (1,2), (1,3), (2,3): the volume is also 0 for coplanar vectors, so we log these."""
    n = [F.normalize(f.detach().float(), dim=-1) for f in (f1, f2, f3)]
    return tuple(float((a * b).sum(-1).mean()) for a, b in ((n[0], n[1]), (n[0], n[2]), (n[1], n[2])))


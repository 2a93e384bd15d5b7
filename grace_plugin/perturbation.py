"""Weight perturbations that are always undone exactly.

``perturbed(params, deltas)`` adds deltas in place and, on exit (also when the body raises), copies back the
saved tensors: SAM-style save/restore, never AWP-style subtraction, so the weights come back bit for bit
(subtracting the delta again, as AWP's code does, leaves rounding error).
``awp_branch(modules)`` is the same guarantee for GRACE's additive low-rank branch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

__all__ = ["perturbed", "awp_branch", "sam_perturbation", "linearized_loss", "top_singular", "low_rank_ascent",
           "low_rank_projection"]


@contextlib.contextmanager
def perturbed(params: Iterable[torch.nn.Parameter], deltas: Iterable[torch.Tensor]) -> Iterator[None]:
    params, deltas = list(params), list(deltas)
    if len(params) != len(deltas):
        raise ValueError(f"{len(params)} parameters but {len(deltas)} deltas")
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d.to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextlib.contextmanager
def awp_branch(modules) -> Iterator[None]:
    """Enable the LAR-AWP branch of LoRALinear modules; on exit disable it and reset its factors to zero.

    The factors are *rebound* to fresh zero tensors, not zeroed in place: autograd graphs built inside the block
    (e.g. the f_AWP forward, back-propagated after the block) saved the old tensors.
    """
    modules = list(modules)
    try:
        for m in modules:
            m.awp_enabled = True
        yield
    finally:
        for m in modules:
            m.awp_enabled = False
            m.awp_record, m.awp_io = False, None
            m.awp_A = torch.zeros_like(m.awp_A, requires_grad=False)
            m.awp_B = torch.zeros_like(m.awp_B, requires_grad=False)
            m.awp_mask = torch.zeros_like(m.awp_mask)


def sam_perturbation(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor], rho: float,
                     adaptive: bool = False, eta: float = 0.0) -> list[torch.Tensor]:
    """SAM's ascent ``ε* = ρ g/||g||`` or ASAM's ``ε* = ρ T² g/||T g||`` with ``T = diag(|w| + eta)``
    (SAM arXiv 2010.01412; ASAM arXiv 2102.11600).

    The norm is global over all tensors (both papers); computed in fp32.
    """
    params, grads = list(params), list(grads)
    scales = [(p.detach().float().abs() + eta) if adaptive else None for p in params]
    tg = [g.float() * t if t is not None else g.float() for g, t in zip(grads, scales)]
    norm = torch.sqrt(sum((x * x).sum() for x in tg)) + 1e-12
    return [(x * t if t is not None else x) * (rho / norm) for x, t in zip(tg, scales)]


def linearized_loss(value: torch.Tensor, params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor]) -> torch.Tensor:
    """A scalar equal to ``value`` whose gradient w.r.t. ``params`` is ``grads``.

    Lets a recipe that computed its gradients elsewhere (SAM: at ``w + ε*``, inside ``perturbed()``, which restores
    ``w`` on exit) hand the trainer an ordinary loss: one ``backward()`` then deposits exactly those gradients, and
    gradient accumulation, clipping and the NaN guard work unchanged.
    """
    dot = sum((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads))
    return value.detach() + dot - dot.detach()


def top_singular(m: torch.Tensor, r: int, generator: torch.Generator | None = None, oversample: int = 4,
                 niter: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_r, S_r, Vh_r)``: the top-``r`` singular triplets of a matrix ``m`` (float32), by the randomized range
    finder with ``niter`` power iterations (Halko, Martinsson and Tropp, arXiv 0909.4061, Algs. 4.4 and 5.1).

    ``torch.svd_lowrank`` computes the same but draws its test matrix from the global RNG; this one takes a
    generator, so every rank and a resumed run draw the same. Small matrices get an exact SVD."""
    m = m.float()
    k = min(r + oversample, *m.shape)
    if min(m.shape) <= 2 * k:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    omega = torch.randn(m.shape[1], k, device=m.device, dtype=m.dtype, generator=generator)
    q, _ = torch.linalg.qr(m @ omega)
    for _ in range(niter):  # power iterations, re-orthonormalised each half step
        q, _ = torch.linalg.qr(m.t() @ q)
        q, _ = torch.linalg.qr(m @ q)
    u, s, vh = torch.linalg.svd(q.t() @ m, full_matrices=False)
    return (q @ u)[:, :r], s[:r], vh[:r]


def low_rank_ascent(g: torch.Tensor, r: int, radius: float, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``r`` perturbation that most increases the first-order loss ``<g, Δ>`` under ``||Δ||_F <= radius``,
    as factors ``(B, A)`` with ``Δ = B A`` (``B``: out x r, ``A``: r x in).

    With ``g = U S V^T``, ``<g, Δ> <= ||P_r(g)||_F ||Δ||_F`` over rank-``r`` ``Δ`` (Eckart-Young-Mirsky), with equality
    at ``Δ = radius U_r S_r V_r^T / ||S_r||_F``: the direction of the truncated SVD, scaled to the bound. This is AWP's
    normalised first step (arXiv 2004.05884, Eq. 9) restricted to rank ``r``. A zero gradient gives ``Δ = 0``."""
    u, s, vh = top_singular(g, r, generator)
    scale = radius / float(s.norm()) if float(s.norm()) > 0 else 0.0
    return u * (s * scale), vh


def low_rank_projection(d: torch.Tensor, r: int, radius: float, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` of the nearest matrix to ``d`` of rank <= ``r`` (truncated SVD) in the ball
    ``||Δ||_F <= radius`` (rescaled onto it when outside): a projected ascent's projection, as ``(B, A)``."""
    u, s, vh = top_singular(d, r, generator)
    n = float(s.norm())
    scale = radius / n if n > radius > 0 else 1.0
    return u * (s * scale), vh

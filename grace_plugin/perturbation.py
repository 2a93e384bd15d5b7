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

__all__ = ["perturbed", "awp_branch", "sam_perturbation", "linearized_loss"]


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

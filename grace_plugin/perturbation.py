"""Weight perturbations that are always undone exactly.

``perturbed(params, deltas)`` adds deltas in place and, on exit (also when the body raises), copies back the
saved tensors: SAM-style save/restore, never AWP-style subtraction, so the weights come back bit for bit
(aesthetics.md §8.8). ``awp_branch(modules)`` is the same guarantee for GRACE's additive low-rank branch.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

__all__ = ["perturbed", "awp_branch"]


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

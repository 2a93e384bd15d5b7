"""Randomness that does not depend on how a step is split over processes.

A draw for one sample comes from a generator seeded by ``(seed, step, global sample index, purpose)``; a draw for
the whole step (an AWP initialisation) from ``(seed, step, purpose)``. So 2 processes holding half of a batch each
draw exactly what 1 process holding the whole batch draws, and a resumed run draws what the uninterrupted run drew,
whatever the number of processes or data workers. The trainer passes ``seed``, ``step`` and the global indices of a
rank's samples in ``StepContext``; outside the trainer (``sample_index`` None) the global generator is used.

Seeds are mixed with SplitMix64 (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014,
https://doi.org/10.1145/2660193.2660195), so neighbouring indices give unrelated generators.
"""
from __future__ import annotations

import random
import zlib

import numpy as np
import torch

__all__ = ["mix", "sample_seeds", "per_sample_uniform", "per_sample_randint", "step_generator", "rng_state",
           "set_rng_state"]

_MASK = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def mix(*parts: int | str) -> int:
    """A 63-bit seed from integers and purpose strings (strings by CRC-32)."""
    h = 0
    for p in parts:
        v = zlib.crc32(p.encode()) if isinstance(p, str) else int(p)
        h = _splitmix(h ^ (v & _MASK))
    return h >> 1


def sample_seeds(seed: int, step: int, index: torch.Tensor, purpose: str) -> list[int]:
    return [mix(seed, step, int(i), purpose) for i in index.tolist()]


def _generator(device: torch.device, s: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(s)


def per_sample_uniform(like: torch.Tensor, lo: float, hi: float, ctx, purpose: str) -> torch.Tensor:
    """``U(lo, hi)`` noise shaped like ``like``; row ``i`` from sample ``ctx.sample_index[i]``'s own generator."""
    index = getattr(ctx, "sample_index", None) if ctx is not None else None
    if index is None:
        return torch.empty_like(like).uniform_(lo, hi)
    out = torch.empty_like(like)
    for row, s in zip(out, sample_seeds(ctx.seed, ctx.step, index, purpose)):
        row.uniform_(lo, hi, generator=_generator(like.device, s))
    return out


def per_sample_randint(high: int, n: int, device, ctx, purpose: str) -> torch.Tensor:
    """``n`` integers in ``[0, high)``, one per sample, each from that sample's generator."""
    index = getattr(ctx, "sample_index", None) if ctx is not None else None
    if index is None:
        return torch.randint(high, (n,), device=device)
    return torch.tensor([int(torch.randint(high, (1,), generator=_generator(torch.device("cpu"), s)))
                         for s in sample_seeds(ctx.seed, ctx.step, index, purpose)], device=device)


def step_generator(ctx, purpose: str, device) -> torch.Generator | None:
    """A generator for a draw shared by the whole step (same on every rank); None outside the trainer."""
    if ctx is None or getattr(ctx, "sample_index", None) is None:
        return None
    return _generator(torch.device(device), mix(ctx.seed, ctx.step, purpose))


def rng_state() -> dict:
    """The global generators' states (torch, numpy, Python, CUDA) as a dict ``torch.save`` writes and
    ``torch.load(weights_only=True)`` reads back (a training state's ``rng``)."""
    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store its parts as tensors.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached": float(cached)}
    st = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])

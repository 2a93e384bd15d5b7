"""Gradients and flags averaged or agreed over ``torchrun`` ranks, for recipes that run several forwards per step
(attacks, AWP ascent), which DDP's one-forward-one-backward reducer does not model: an all-reduce after backward
(``all_reduce_grads``), or bucketed all-reduces overlapped with backward (``OverlappedGradSync``); ``ranks_agree``
is one all-reduce of a flag (preemption, a non-finite step)."""
from __future__ import annotations

import torch

__all__ = ["all_reduce_grads", "ranks_agree", "OverlappedGradSync"]


def all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks. Recipes run several forwards per step (attacks, AWP ascent), which DDP's
    one-forward-one-backward reducer does not model; an explicit all-reduce keeps recipes unaware of DDP."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def ranks_agree(flag: bool, world: int, device, every: bool) -> bool:
    """One all-reduce of a flag: true on every rank (``every``) or on any rank; every rank takes part."""
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN if every else torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


class OverlappedGradSync:
    """Average gradients over ranks while backward runs, as DDP's reducer does (Li et al., "PyTorch Distributed:
    Experiences on Accelerating Data Parallel Training", VLDB 2020, https://arxiv.org/abs/2006.15704, Sec. 3.2):
    parameters in reverse registration order (about the order backward produces their gradients) are grouped in
    buckets of ``bucket_bytes``; a hook after each gradient's accumulation marks it ready and a bucket whose
    gradients are all ready is all-reduced asynchronously, buckets launched strictly in index order so every rank
    issues the same collectives in the same order. ``finish`` launches the buckets left (parameters without a
    gradient this step contribute zeros, and keep ``grad = None``), waits and writes the averages back.
    Only armed backwards reduce: the last micro-batch of a step (earlier ones accumulate locally, DDP's no_sync).
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, bucket_bytes: int = 25 << 20):
        self.world = world
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = bucket_bytes + 1
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if size + nbytes > bucket_bytes and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.armed = False
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self.missing = [len(b) for b in self.buckets]
        self.next = 0
        self.works: list = []

    def arm(self) -> None:
        self._reset()
        self.armed = True

    def _ready(self, p) -> None:
        if not self.armed:
            return
        self.missing[self.where[id(p)]] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] == 0:
            self._launch(self.next)
            self.next += 1

    def _launch(self, i: int) -> None:
        ps = self.buckets[i]
        if all(p.grad is None for p in ps):
            return  # no gradient anywhere in this bucket this step (the same on every rank)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        self.works.append((ps, flat, torch.distributed.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        while self.next < len(self.buckets):
            self._launch(self.next)
            self.next += 1
        for ps, flat, work in self.works:
            work.wait()
            flat /= self.world
            off = 0
            for p in ps:
                if p.grad is not None:
                    p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()
        self.armed = False
        self._reset()

    def close(self) -> None:
        for h in self.handles:
            h.remove()

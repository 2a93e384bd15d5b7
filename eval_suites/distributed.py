"""Evaluation over ``torchrun`` ranks: every rank scores its own batches (``make_eval_loader`` assigns batch
``(shard, k)`` to rank ``(shard + k) % W``), then the per-batch records (per-sample results) are gathered, so every
rank holds the one-process result and rank 0 writes the report. One process is the special case ``W = 1``.
"""
from __future__ import annotations

import torch

__all__ = ["rank_world", "init", "all_gather", "merge_records", "is_main"]


def rank_world() -> tuple[int, int]:
    from grace_plugin.trainer import world_info

    return world_info()


def is_main() -> bool:
    return rank_world()[0] == 0


def init() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); a no-op for one process."""
    from grace_plugin.trainer import init_distributed

    return init_distributed()


def all_gather(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects; ``[obj]`` for one process)."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def merge_records(records: list[dict]) -> list[dict]:
    """Gather every rank's per-batch records and sort them by batch key; a key seen twice is a bug."""
    merged = sorted((r for part in all_gather(records) for r in part), key=lambda r: tuple(r["key"]))
    keys = [tuple(r["key"]) for r in merged]
    if len(set(keys)) != len(keys):
        twice = sorted(k for k in set(keys) if keys.count(k) > 1)[:3]
        raise RuntimeError(f"batch keys scored twice across ranks: {twice}")
    return merged

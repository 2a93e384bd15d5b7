"""Evaluation over ``torchrun`` ranks: every rank scores its own batches, then the per-batch records (per-sample
results) are gathered, so every rank holds the one-process result and rank 0 writes the report. One process is the
special case ``W = 1``. The process group itself is ``grace_plugin.runtime``'s.
"""
from __future__ import annotations

from grace_plugin.runtime import all_gather

__all__ = ["merge_records"]


def merge_records(records: list[dict]) -> list[dict]:
    """Gather every rank's per-batch records and sort them by batch key; a key seen twice is a bug."""
    merged = sorted((r for part in all_gather(records) for r in part), key=lambda r: tuple(r["key"]))
    keys = [tuple(r["key"]) for r in merged]
    if len(set(keys)) != len(keys):
        twice = sorted(k for k in set(keys) if keys.count(k) > 1)[:3]
        raise RuntimeError(f"batch keys scored twice across ranks: {twice}")
    return merged

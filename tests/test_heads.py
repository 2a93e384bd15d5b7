"""Zero-shot heads built once across ranks: each rank encodes its own batches of class names, the rows are gathered,
and the head equals the one-process head bit for bit (the batches are the very ones one process encodes)."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.mark.parametrize("world,n_classes", [(2, 25), (3, 25), (4, 25), (3, 10), (2, 7)])
def test_head_shared_over_ranks_equals_one_process(world, n_classes, tiny_bundle, monkeypatch):
    """Ranks simulated in turn: each rank's part is what it computes under (rank, world); the gather hands every rank
    all parts; the assembled head of every rank equals the one-process head exactly (also with fewer batches of 10
    class names than ranks, where some ranks encode nothing)."""
    import grace_plugin.runtime as runtime
    from grace_plugin.models.clip import zero_shot_weights

    names = [f"class {i}" for i in range(n_classes)]
    templates = ["a photo of a {c}.", "a sketch of a {c}."]
    one = zero_shot_weights(tiny_bundle, names, templates)
    assert one.shape[0] == n_classes

    parts, encoded = [], []

    class Collected(Exception):
        pass

    def collect(obj):
        parts.append(obj)
        raise Collected

    monkeypatch.setattr(runtime, "all_gather", collect)
    for r in range(world):
        monkeypatch.setattr(runtime, "world_info", lambda r=r: (r, world))
        with pytest.raises(Collected):
            zero_shot_weights(tiny_bundle, names, templates, share_ranks=True)
        encoded.append(0 if parts[-1] is None else parts[-1].shape[0])
    assert sum(encoded) == n_classes  # every class encoded once, on one rank
    batches = math.ceil(n_classes / 10)  # open_clip's batches of 10 names, spread over the ranks
    assert max(encoded) <= math.ceil(batches / world) * 10 and sum(e > 0 for e in encoded) == min(batches, world)
    monkeypatch.setattr(runtime, "all_gather", lambda obj: list(parts))
    for r in range(world):
        monkeypatch.setattr(runtime, "world_info", lambda r=r: (r, world))
        assert torch.equal(zero_shot_weights(tiny_bundle, names, templates, share_ranks=True), one)

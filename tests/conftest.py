"""Shared fixtures: a small synthetic world and a tiny CLIP, both built into tmp dirs once per session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import grace_plugin  # noqa: E402,F401  (autoattack shim)
from grace_plugin.data.synthetic import SyntheticWorldSpec, write_synthetic_world  # noqa: E402


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_world(root, seed=0, spec=SyntheticWorldSpec.small())
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_world, tmp_path_factory):
    from grace_plugin.testbed import PretrainConfig, pretrain_tiny_clip

    out = tmp_path_factory.mktemp("clip") / "pretrained"
    return pretrain_tiny_clip(tiny_world / "pairs", out, PretrainConfig(steps=30, batch_size=64, width=64, layers=2,
                                                                       warmup_steps=5), progress=False)


@pytest.fixture()
def tiny_classifier(tiny_clip_dir, tiny_world):
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.models.clip import classifier_from_clip, load_clip

    shards = open_shard_set(tiny_world / "id", split="train")
    return classifier_from_clip(load_clip(tiny_clip_dir), shards.classnames, shards.templates)


@pytest.fixture()
def tiny_batch(tiny_world, tiny_classifier):
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.transforms import eval_transform

    shards = open_shard_set(tiny_world / "id")
    return next(iter(make_eval_loader(shards.urls, eval_transform(tiny_classifier.pretrained_cfg), 8, 10)))

"""Shared fixtures: a small synthetic world and a tiny CLIP, both built into tmp dirs once per session."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import grace_plugin  # noqa: E402,F401  (autoattack shim)
from grace_app.testbed.world import SyntheticWorldSpec, write_synthetic_world  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """AutoAttack on a tiny model is thousands of tiny ops: intra-op threads only contend on a shared 2-core box
    (measured 20x slower with 2 threads under load). ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_synthetic_world(root, seed=0, spec=SyntheticWorldSpec.small())
    return root


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_world, tmp_path_factory):
    from grace_app.testbed.tiny_clip import PretrainConfig, pretrain_tiny_clip

    out = tmp_path_factory.mktemp("clip") / "pretrained"
    return pretrain_tiny_clip(tiny_world / "pairs", out, PretrainConfig(steps=30, batch_size=64, width=64, layers=2,
                                                                       warmup_steps=5), progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_clip_dir):
    """The tiny open_clip model, loaded once; tests get copies (``tiny_text``) since FLYP trains it in place."""
    from grace_plugin.models.clip import load_clip

    return load_clip(tiny_clip_dir)


@pytest.fixture(scope="session")
def _tiny_classifier_once(tiny_bundle, tiny_world):
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.models.clip import classifier_from_clip

    shards = open_shard_set(tiny_world / "id", split="train")
    return classifier_from_clip(tiny_bundle, shards.classnames, shards.templates)


@pytest.fixture()
def tiny_classifier(_tiny_classifier_once):
    """A fresh copy of the tiny zero-shot classifier (its head is built from the text side once per session)."""
    return copy.deepcopy(_tiny_classifier_once)


@pytest.fixture()
def tiny_text(tiny_bundle, tiny_world):
    """The text side a recipe may train (a fresh copy of the session's CLIP) with the ID class prompts."""
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.recipes import TextSide

    shards = open_shard_set(tiny_world / "id", split="train")
    return TextSide(copy.deepcopy(tiny_bundle), shards.classnames, shards.templates)


@pytest.fixture(scope="session")
def _tiny_batch_once(tiny_world, _tiny_classifier_once):
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.transforms import eval_transform

    shards = open_shard_set(tiny_world / "id")
    return next(iter(make_eval_loader(shards.urls, eval_transform(_tiny_classifier_once.pretrained_cfg), 8, 10)))


@pytest.fixture()
def tiny_batch(_tiny_batch_once):
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in _tiny_batch_once.items()}


@pytest.fixture()
def tower_rows():
    """``tower_rows(fn)`` -> ``(fn(), rows)``: the batch size of every ViT tower forward ``fn`` runs, counted by a
    global forward hook (how the recipes' declared forward passes are checked)."""
    from timm.models.vision_transformer import VisionTransformer

    def run(fn):
        rows = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: rows.append(a[0].shape[0]) if isinstance(m, VisionTransformer) else None)
        try:
            return fn(), rows
        finally:
            handle.remove()

    return run


@pytest.fixture()
def die_at_step():
    """``die_at_step(rec, step)``: recipe ``rec``'s training step raises KeyboardInterrupt at trainer step ``step``
    (a simulated kill)."""
    def wrap(rec, step: int) -> None:
        orig = rec.training_step

        def dying(batch, ctx):
            if ctx.step == step:
                raise KeyboardInterrupt("simulated kill")
            return orig(batch, ctx)

        rec.training_step = dying

    return wrap


@pytest.fixture()
def killed_trainer(monkeypatch, die_at_step):
    """``with killed_trainer(step):`` every run the trainer starts inside the block is killed at trainer step
    ``step`` (KeyboardInterrupt, through ``die_at_step``); the real trainer is back after it."""
    import contextlib

    from grace_plugin import trainer

    @contextlib.contextmanager
    def kill(step: int):
        real = trainer.train

        def dying(rec, *a, **k):
            die_at_step(rec, step)
            return real(rec, *a, **k)

        monkeypatch.setattr(trainer, "train", dying)
        try:
            yield
        finally:
            monkeypatch.setattr(trainer, "train", real)

    return kill


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip where no CUDA device is visible (tox -e slow runs them; tox -e py deselects them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

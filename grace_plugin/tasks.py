"""Tasks: what a sample holds, what the model takes besides the image, and what a prediction is. A registry
(``register_task``, ``get_task``, ``list_tasks``); recipes declare the tasks they support (``Recipe.tasks``).

* ``classification``: ``{"image", "label": int}``; the model takes the image only.
* ``vqa``: ``{"image", "label": soft answer target, "question", "record"}`` (``grace_plugin/vqa/data.py``); the
  model takes the image with the batch's questions bound (``grace_plugin/vqa/model.py``), so recipes, attacks and
  the trainer run unchanged and the loss is the soft-target cross-entropy of the VQA accuracy.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UsageError
from .registries import Registry

__all__ = ["Task", "TaskModel", "register_task", "get_task", "list_tasks"]


class UnknownTaskError(UsageError, KeyError):
    pass


@dataclass
class TaskModel:
    """What ``fine_tune`` trains for a task: the model, its output names (class names or answers), the sample
    decoder's target for training (None: the class label) and the batch binder (``Task.binder``'s result)."""

    model: object
    labels: list[str]
    target: Callable | None
    bind: Callable[[dict], contextlib.AbstractContextManager]
    tower: dict | None = None  # checkpoint.json's architecture.tower (None: the CLIP's timm tower spec)


@dataclass(frozen=True)
class Task:
    """``target(vocabulary, train)``: the sample decoder's task fields (None: the classification label);
    ``binder(model, encoder)``: ``batch -> context manager`` to hold around every forward of that batch;
    ``build(bundle, shards, data_cfg, seed)``: the ``TaskModel`` a run on the train split ``shards`` starts from."""

    name: str
    description: str
    target: Callable[[list[str] | None, bool], Callable | None]
    binder: Callable[[object, object], Callable[[dict], contextlib.AbstractContextManager]]
    build: Callable[..., TaskModel]


_TASKS: Registry[Task] = Registry("task", UnknownTaskError)


def register_task(task: Task) -> Task:
    return _TASKS.register(task.name)(task)


def get_task(name: str) -> Task:
    return _TASKS.get(name)


def list_tasks() -> list[str]:
    return _TASKS.names()


def _no_binding(model, encoder):
    return lambda batch: contextlib.nullcontext()


def _vqa_target(vocabulary, train):
    from .vqa.data import VqaTarget

    return VqaTarget(vocabulary, train)


def _vqa_binder(model, encoder):
    from .vqa.model import bound

    return lambda batch: bound(encoder.context(model, batch["question"]))


def _build_classification(bundle, shards, data_cfg, seed) -> TaskModel:
    from .models.clip import classifier_from_clip

    classnames = shards.require_classnames()
    model = classifier_from_clip(bundle, classnames, shards.templates or [], device="cpu")
    return TaskModel(model, classnames, None, _no_binding(model, None))


def _build_vqa(bundle, shards, data_cfg, seed) -> TaskModel:
    """The VQA model of the backbone that takes ``bundle`` (``grace_plugin/vqa/backbones.py``: CLIP with an answer
    head, or a generative CoCa)."""
    from .errors import UsageError as _Usage
    from .vqa.backbones import backbone_for
    from .vqa.data import answer_vocabulary, read_records

    if shards.layout != "vqa":
        raise _Usage(f"data.task=vqa: {shards.root} is a {shards.layout} set, not a VQA set (grace shards convert "
                     "--format frames|coco-vqa writes one)")
    backbone = backbone_for(bundle)
    answers: list[str] = []
    if backbone.uses_vocabulary:
        answers = answer_vocabulary(read_records(shards.urls), data_cfg.answers_min_count, data_cfg.answers_max)
        if not answers:
            raise _Usage(f"data.answers_min_count={data_cfg.answers_min_count}: no answer of {shards.root} split "
                         f"{shards.split} is given that often; lower it")
    model, target, bind = backbone.build(bundle, answers, seed)
    return TaskModel(model, answers, target, bind, tower=backbone.tower(bundle))


register_task(Task("classification", "image -> class (a zero-shot CLIP head over the set's class names)",
                   lambda vocabulary, train: None, _no_binding, _build_classification))
register_task(Task("vqa", "image + question -> answer (CLIP towers with an answer head; the official VQA accuracy)",
                   _vqa_target, _vqa_binder, _build_vqa))

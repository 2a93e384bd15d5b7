"""VQA backbones: a registry of the model families a VQA run trains and evaluates, chosen by the pre-trained model.

* ``clip`` (discriminative): ``ClipVQA``, CLIP's two towers with an answer head over the ID train answers, and
  ``ZeroShotVQA``, CLIP scoring each answer's prompt (``grace_plugin/vqa/model.py``);
* ``coca`` (generative): ``CocaVQA``, open_clip's CoCa answering in words after ``"question: ... answer:"``,
  trained on the answer tokens (FRAMES-VQA's PaliGemma recipe, arXiv 2505.21755 §5), zero-shot by the pre-trained
  CoCa itself (``grace_plugin/vqa/generative.py``).

Each entry says which pre-trained models it takes (``matches``), how to build the model a run starts from with its
sample target and batch binding (``build``), the zero-shot model (``zero_shot``) and the architecture a run folder's
weights load into (``rebuild``, keyed by ``kind``, the ``architecture.head.kind`` of its checkpoint.json). A new
backbone is a new entry.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UsageError
from ..tensor_io import CheckpointError
from ..registries import Registry

__all__ = ["VqaBackbone", "register_backbone", "backbone_for", "backbone_of_run", "list_backbones"]


@dataclass(frozen=True)
class VqaBackbone:
    """``build(bundle, answers, seed) -> (model, sample target, batch -> context manager)``; ``zero_shot(bundle,
    answers) -> model``; ``rebuild(meta, where) -> model`` (the architecture a run's checkpoint.json describes, its
    weights not loaded); ``tower(bundle) -> dict | None``: what a run's checkpoint.json records as
    ``architecture.tower`` (None: the timm tower spec of a CLIP)."""

    name: str
    kind: str
    description: str
    matches: Callable[[object], bool]
    uses_vocabulary: bool
    build: Callable
    zero_shot: Callable
    rebuild: Callable
    tower: Callable = lambda bundle: None


_BACKBONES: Registry[VqaBackbone] = Registry("VQA backbone", UsageError)


def register_backbone(backbone: VqaBackbone) -> VqaBackbone:
    return _BACKBONES.register(backbone.name)(backbone)


def list_backbones() -> list[str]:
    return _BACKBONES.names()


def backbone_for(bundle) -> VqaBackbone:
    """The backbone that takes the pre-trained ``bundle`` (the last registered that matches: a specific family
    before the generic CLIP)."""
    for name in reversed(_BACKBONES.names()):
        if _BACKBONES.get(name).matches(bundle):
            return _BACKBONES.get(name)
    raise UsageError(f"{bundle.model_name}: no VQA backbone takes this model (known: {', '.join(list_backbones())})")


def backbone_of_run(meta: dict, where) -> VqaBackbone:
    kind = ((meta.get("architecture") or {}).get("head") or {}).get("kind", "answer")
    for name in _BACKBONES.names():
        if _BACKBONES.get(name).kind == kind:
            return _BACKBONES.get(name)
    raise CheckpointError(f"{where}: architecture.head.kind {kind!r} is no VQA backbone "
                          f"({', '.join(list_backbones())})")


# ------------------------------------------------------------------------------------------------ clip

def _clip_build(bundle, answers, seed):
    from .data import VqaTarget
    from .model import QuestionEncoder, bound, vqa_model_from_clip

    model = vqa_model_from_clip(bundle, answers, seed=seed)
    encoder = QuestionEncoder(bundle)
    return model, VqaTarget(answers, True), lambda batch: bound(encoder.context(model, batch["question"]))


def _clip_zero_shot(bundle, answers):
    from .model import zero_shot_vqa_from_clip

    return zero_shot_vqa_from_clip(bundle, answers)


def _clip_rebuild(meta, where):
    from ..models.clip import build_tower
    from .model import ClipVQA

    arch = meta["architecture"]
    return ClipVQA.from_spec(build_tower(arch["tower"]), arch, meta["pretrained_cfg"], meta["classnames"])


register_backbone(VqaBackbone(
    "clip", "answer", "CLIP towers + an answer head over the ID train answers (zero-shot: each answer's prompt scored)",
    lambda bundle: True, True, _clip_build, _clip_zero_shot, _clip_rebuild))


# ------------------------------------------------------------------------------------------------ coca

def _is_coca(bundle) -> bool:
    return "multimodal_cfg" in (bundle.model_cfg or {})


def _coca_build(bundle, answers, seed):
    from .generative import CocaTarget, coca_vqa_from_clip
    from .model import QuestionContext, bound

    model = coca_vqa_from_clip(bundle)

    def bind(batch):
        if "text" not in batch:  # an evaluation probe without answers: the questions only
            return bound(QuestionContext(questions=list(batch["question"])))
        return bound(QuestionContext(questions=list(batch["question"]), text=batch["text"], labels=batch["label"],
                                     positions=batch["positions"]))

    return model, CocaTarget(model.tokens), bind


def _coca_rebuild(meta, where):
    import open_clip

    from ..models.clip import register_open_clip_config
    from .generative import CocaVQA

    clip = meta.get("clip") or {}
    if not {"model_name", "model_cfg"} <= set(clip):
        raise CheckpointError(f"{where}: a CoCa run needs clip.model_name and clip.model_cfg in checkpoint.json")
    register_open_clip_config(clip["model_name"], clip["model_cfg"])
    coca = open_clip.create_model(clip["model_name"], pretrained=None)
    cfg = meta["pretrained_cfg"]
    return CocaVQA(coca, cfg["mean"], cfg["std"], open_clip.get_tokenizer(clip["model_name"]),
                   int(meta["architecture"]["head"].get("max_new_tokens", 6)), pretrained_cfg=cfg)


def _coca_zero_shot(bundle, answers):
    from .generative import coca_vqa_from_clip

    return coca_vqa_from_clip(bundle)


register_backbone(VqaBackbone(
    "coca", "coca", "open_clip CoCa answering in words (greedy), trained on the answer tokens",
    _is_coca, False, _coca_build, _coca_zero_shot, _coca_rebuild,
    tower=lambda bundle: {"arch": "open_clip", "model_name": bundle.model_name}))

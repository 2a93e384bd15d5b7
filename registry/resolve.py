"""Resolve what a user names as a model (run folder, weights file, CLIP folder, timm name) into a classifier.

``load_model(spec)`` returns a ``LoadedModel``; ``LoadedModel.for_classes(classnames, templates)`` gives a
classifier whose zero-shot head matches a data set's class names, rebuilding the head through the model's text
tower when the names differ (the run folder carries the text tower for exactly this).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from grace_plugin.errors import GraceError

__all__ = ["LoadedModel", "load_model", "ModelNotFound"]


class ModelNotFound(GraceError, ValueError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module | None
    name: str
    classnames: list[str] | None = None
    text: object | None = None  # grace_plugin.models.clip.ClipBundle with the text tower
    meta: dict = field(default_factory=dict)
    clip: object | None = None  # a whole CLIP (zero-shot from a pretrained folder)

    def for_classes(self, classnames: list[str] | None, templates: list[str] | None,
                    device: str | torch.device = "cpu") -> nn.Module:
        from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
        from grace_plugin.models.clip import classifier_from_clip, zero_shot_weights

        if self.clip is not None:
            if not classnames:
                raise ModelNotFound(f"{self.name}: a CLIP needs the data set's classnames.txt to build its head")
            return classifier_from_clip(self.clip, classnames, templates or [], device=device).to(device)
        if classnames is None or classnames == self.classnames:
            return self.model
        if self.text is None:
            raise ModelNotFound(f"{self.name}: its head has {len(self.classnames or [])} classes and it carries no "
                                f"text tower to build a head for the {len(classnames)} classes of this data set")
        w = zero_shot_weights(self.text, classnames, templates or [], device=device)
        head = ZeroShotHead(w, float(self.model.head.logit_scale)).to(device)
        return ClipClassifier(self.model.visual, head, self.model.pretrained_cfg).eval()

    @property
    def pretrained_cfg(self) -> dict:
        if self.clip is not None:
            from grace_plugin.models.clip import pretrained_cfg_from_clip

            return pretrained_cfg_from_clip(self.clip)
        return dict(getattr(self.model, "pretrained_cfg", {}))


def load_model(spec: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """A run folder, its ``model.safetensors``, a CLIP folder (``open_clip_config.json``) or a timm model name."""
    from grace_plugin.checkpoint import load_run
    from grace_plugin.models.clip import bundle_from_text_state, load_clip

    p = Path(str(spec)).expanduser()
    run_dir = p if p.is_dir() else p.parent
    if (p.is_dir() and (p / "checkpoint.json").is_file()) or (p.is_file() and (run_dir / "checkpoint.json").is_file()):
        model, meta = load_run(p, device=device)
        text = None
        text_file = run_dir / "text.safetensors"
        if text_file.is_file() and meta.get("clip"):
            from .weights import load_state_dict_safe

            text = bundle_from_text_state(meta["clip"]["model_name"], meta["clip"]["model_cfg"],
                                          load_state_dict_safe(text_file))
        return LoadedModel(model, str(spec), meta["classnames"], text, meta)
    if p.is_dir() and (p / "open_clip_config.json").is_file():
        return LoadedModel(None, str(spec), clip=load_clip(p, device=device))
    if p.exists():
        raise ModelNotFound(f"{p}: not a grace run folder (no checkpoint.json) nor a CLIP folder "
                            "(no open_clip_config.json)")
    import timm

    import registry  # noqa: F401  (registers our timm names)

    name = str(spec)
    if not timm.is_model(name.split(".")[0]) and not name.startswith("hf-hub:"):
        raise ModelNotFound(f"--model {name!r}: not a folder or file, and not a registered timm model name")
    model = timm.create_model(name, pretrained=True).to(device).eval()
    classnames = getattr(model, "classnames", None)
    # GRACE entries (registry.grace_models) carry their class names and text tower, so heads can be rebuilt.
    text = model.text_bundle() if callable(getattr(model, "text_bundle", None)) else None
    meta = dict(getattr(model, "card", None) or {})
    meta.pop("classnames", None)
    return LoadedModel(model, name, classnames, text, meta)

"""Resolve what a user names as a model (run folder, weights file, CLIP folder, timm name) into a classifier.

``load_model(spec)`` returns a ``LoadedModel``; ``LoadedModel.for_classes(classnames, templates)`` gives a
classifier whose zero-shot head matches a data set's class names, rebuilding the head through the model's text
tower when the names differ (the run folder carries the text tower for exactly this).
"""
from __future__ import annotations

from collections.abc import Callable
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
    text_loader: Callable[[], object] | None = None  # builds ``text`` on first use (``text_tower``)

    def text_tower(self):
        """The text tower, built on first use: most evaluations score with the model's own head and never need it,
        and building a CLIP's text tower costs seconds of every rank's start-up (bench/eval_speed.py)."""
        if self.text is None and self.text_loader is not None:
            self.text, self.text_loader = self.text_loader(), None
        return self.text

    def for_classes(self, classnames: list[str] | None, templates: list[str] | None,
                    device: str | torch.device = "cpu") -> nn.Module:
        return self.head_for(classnames, templates, device)[0]

    def head_for(self, classnames: list[str] | None, templates: list[str] | None,
                 device: str | torch.device = "cpu", share_ranks: bool = False) -> tuple[nn.Module, dict]:
        """``(classifier, head)`` for a data set's class names; ``head`` says which head is used and why:
        ``{"head": "own" | "zero-shot" | "rebuilt", "classes": N, "reason": str}``. The model's own (fine-tuned)
        head is used when the names match; a run that records no class names keeps its own head when the set has
        as many classes; otherwise a zero-shot head is built from the text tower and the reason names the
        mismatch (callers print it: a fine-tuned head is never replaced silently). ``share_ranks``: every rank
        calls this together and a head to build is encoded once across them (``zero_shot_weights``)."""
        from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
        from grace_plugin.models.clip import classifier_from_clip, zero_shot_weights

        if self.clip is not None:
            if not classnames:
                raise ModelNotFound(f"{self.name}: a CLIP needs the data set's classnames.txt to build its head")
            model = classifier_from_clip(self.clip, classnames, templates or [], device=device,
                                         share_ranks=share_ranks).to(device)
            return model, {"head": "zero-shot", "classes": len(classnames),
                           "reason": "a CLIP folder: zero-shot head from the set's class names"}
        n_head = int(self.model.head.weight.shape[0]) if hasattr(getattr(self.model, "head", None), "weight") \
            else len(self.classnames or [])
        if classnames is None:
            return self.model, {"head": "own", "classes": n_head,
                                "reason": f"the set has no class names: the model's own {n_head}-class head, the "
                                          "set's labels taken as head indices"}
        if classnames == self.classnames:
            return self.model, {"head": "own", "classes": n_head, "reason": "the set's class names are the head's"}
        if not self.classnames and len(classnames) == n_head:
            return self.model, {"head": "own", "classes": n_head,
                                "reason": f"the model records no class names; its {n_head}-class head is used with "
                                          "the set's labels as head indices"}
        if not self.classnames:
            why = f"the model records no class names and its head has {n_head} classes, the set {len(classnames)}"
        elif len(classnames) != len(self.classnames):
            why = f"the set has {len(classnames)} class names, the model's head {len(self.classnames)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(classnames, self.classnames)) if a != b)
            why = (f"the set's class names differ from the head's (first at label {i}: {classnames[i]!r} vs "
                   f"{self.classnames[i]!r})")
        text = self.text_tower()
        if text is None:
            raise ModelNotFound(f"{self.name}: {why}, and it carries no text tower to build a head for them")
        w = zero_shot_weights(text, classnames, templates or [], device=device, share_ranks=share_ranks)
        head = ZeroShotHead(w, float(self.model.head.logit_scale)).to(device)
        model = ClipClassifier(self.model.visual, head, self.model.pretrained_cfg).eval()
        return model, {"head": "rebuilt", "classes": len(classnames),
                       "reason": f"{why}: zero-shot head rebuilt from the text tower "
                                 "(the model's own head is not used)"}

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
        if meta.get("task", "classification") != "classification":
            raise ModelNotFound(f"--model {spec}: a {meta['task']} run; evaluate it with grace eval --task "
                                f"{meta['task']}")
        text_file, text_loader = run_dir / "text.safetensors", None
        if text_file.is_file() and meta.get("clip"):
            from .weights import load_state_dict_safe

            def text_loader(clip=meta["clip"]):
                return bundle_from_text_state(clip["model_name"], clip["model_cfg"], load_state_dict_safe(text_file))
        return LoadedModel(model, str(spec), meta["classnames"], None, meta, text_loader=text_loader)
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
    text_loader = model.text_bundle if callable(getattr(model, "text_bundle", None)) else None
    meta = dict(getattr(model, "card", None) or {})
    meta.pop("classnames", None)
    return LoadedModel(model, name, classnames, None, meta, text_loader=text_loader)

"""open_clip on the text side, timm on the image side.

* ``load_clip(init)`` opens a CLIP: a folder written by ``save_clip`` (the testbed's tiny CLIP, ``--init DIR``) or
  ``<open_clip model name>:<pretrained tag or file>`` (e.g. ``ViT-B-32-quickgelu:openai``).
* ``tower_spec`` / ``build_tower`` / ``convert_visual`` turn the open_clip visual tower into a timm CLIP
  ``VisionTransformer`` through ``timm.models.vision_transformer.checkpoint_filter_fn``: the same conversion timm
  applies to OpenAI ViT-B/32 weights (QuickGELU archs: https://github.com/huggingface/pytorch-image-models/pull/2033).
* ``zero_shot_weights`` builds the frozen head with ``open_clip.build_zero_shot_classifier``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tensor_io import CheckpointError, check_finite, load_state_dict_checked, read_tensors
from ..errors import InputNotFound, UsageError, read_json

from .classifier import ClipClassifier, ZeroShotHead

__all__ = ["ClipBundle", "TINY_CLIP_NAME", "tiny_clip_config", "register_open_clip_config", "load_clip",
           "save_clip", "tower_spec", "build_tower", "convert_visual", "zero_shot_weights", "classifier_from_clip",
           "pretrained_cfg_from_clip", "OPENAI_TOWERS", "template_fns", "image_tower"]

TINY_CLIP_NAME = "GRACE-Tiny-32"

# open_clip model name -> timm tower with the identical architecture (QuickGELU for OpenAI weights).
OPENAI_TOWERS = {
    "ViT-B-32-quickgelu": "vit_base_patch32_clip_quickgelu_224",
    "ViT-B-16-quickgelu": "vit_base_patch16_clip_quickgelu_224",
    "ViT-L-14-quickgelu": "vit_large_patch14_clip_quickgelu_224",
}


def tiny_clip_config(width: int = 96, layers: int = 3, embed_dim: int = 64, image_size: int = 32,
                     patch_size: int = 8, text_width: int = 64, text_layers: int = 2,
                     context_length: int = 16) -> dict:
    """An open_clip model config for the testbed (QuickGELU, like OpenAI CLIP)."""
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": 32},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width, "heads": 2,
                     "layers": text_layers},
    }


_CFG_DIR: Path | None = None


def register_open_clip_config(name: str, cfg: dict) -> None:
    """Make ``name`` known to open_clip (``add_model_config`` takes files; the name is the file stem)."""
    import open_clip

    global _CFG_DIR
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing == cfg:
            return
    if _CFG_DIR is None:
        _CFG_DIR = Path(tempfile.mkdtemp(prefix="grace_open_clip_cfgs_"))
    path = _CFG_DIR / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)


@dataclass
class ClipBundle:
    model_name: str
    model_cfg: dict
    clip: nn.Module  # open_clip.CLIP
    source: str = ""

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.model_name)


def load_clip(init: str | Path, device: str | torch.device = "cpu") -> ClipBundle:
    """Open a CLIP for fine-tuning: a ``save_clip`` folder, or ``NAME:PRETRAINED`` for open_clip."""
    import open_clip

    p = Path(init).expanduser()
    if p.is_dir():
        meta_file = p / "open_clip_config.json"
        weights = p / "open_clip_model.safetensors"
        if not meta_file.is_file():
            raise InputNotFound(f"{meta_file}: missing; --init DIR must be a folder written by "
                                    "`grace quickstart`/`save_clip`, or NAME:PRETRAINED for open_clip")
        if not weights.is_file():
            raise InputNotFound(f"{weights}: missing")
        meta = read_json(meta_file, CheckpointError, "not a CLIP config written by save_clip")
        if not isinstance(meta, dict) or not {"model_name", "model_cfg"} <= set(meta):
            raise CheckpointError(f"{meta_file}: not a CLIP config written by save_clip (no model_name/model_cfg)")
        name, cfg = meta["model_name"], meta["model_cfg"]
        register_open_clip_config(name, cfg)
        clip = open_clip.create_model(name, pretrained=None, device=device)
        sd = read_tensors(weights, device, what="CLIP weights file")
        load_state_dict_checked(clip, sd, weights, strict=True)
        return ClipBundle(name, cfg, clip.eval(), source=str(p))
    if ":" in str(init):
        name, pretrained = str(init).split(":", 1)
        if open_clip.get_model_config(name) is None:
            raise UsageError(f"unknown open_clip model {name!r} in --init {init!r}")
        file = Path(pretrained).expanduser()
        if file.is_file():
            # a local file: vet it first (safetensors or a tensors-only pickle, all finite) so a code-running
            # pickle or a NaN file is one line, never open_clip's torch.load message; open_clip then loads it
            read_tensors(file, "cpu", what="CLIP weights file")
        try:
            clip = open_clip.create_model(name, pretrained=pretrained, device=device, load_weights_only=True)
        except RuntimeError as e:
            if not file.is_file():
                raise
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or ["?"]
            first = next((ln for ln in lines if "size mismatch" in ln or "key(s)" in ln), lines[0])[:200]
            raise CheckpointError(f"{file}: not an open_clip {name} state dict ({first})") from None
        check_finite(clip.state_dict(), f"--init {init}")
        return ClipBundle(name, open_clip.get_model_config(name), clip.eval(), source=str(init))
    raise InputNotFound(f"--init {init!r}: not a folder and not NAME:PRETRAINED")


def save_clip(bundle: ClipBundle, out: str | Path, extra: dict | None = None) -> Path:
    from ..tensor_io import atomic_write_text, save_tensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(bundle.clip.state_dict(), out / "open_clip_model.safetensors")
    atomic_write_text(out / "open_clip_config.json",
                      json.dumps({"model_name": bundle.model_name, "model_cfg": bundle.model_cfg, **(extra or {})},
                                 indent=2))
    return out


def pretrained_cfg_from_clip(bundle: ClipBundle) -> dict:
    """timm pretrained cfg equal to open_clip's eval preprocessing (shortest-side resize, centre crop)."""
    pp = dict(getattr(bundle.clip.visual, "preprocess_cfg", {}) or {})
    size = bundle.model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    return {
        "input_size": (3, size, size),
        "fixed_input_size": True,
        "interpolation": pp.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
        "first_conv": "visual.patch_embed.proj",
        "classifier": "head",
        "license": "mit",
    }


def tower_spec(model_name: str, model_cfg: dict) -> dict:
    """JSON-serialisable recipe for the timm tower of an open_clip model config."""
    embed_dim = model_cfg["embed_dim"]
    if model_name in OPENAI_TOWERS:
        return {"arch": OPENAI_TOWERS[model_name], "kwargs": {"num_classes": embed_dim}}
    v = model_cfg["vision_cfg"]
    if v.get("timm_model_name"):
        raise UsageError(f"{model_name}: timm-tower open_clip models are not supported yet")
    size = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    width = v["width"]
    return {"arch": None, "kwargs": {
        "img_size": size, "patch_size": v["patch_size"], "embed_dim": width, "depth": v["layers"],
        "num_heads": width // v.get("head_width", 64), "mlp_ratio": v.get("mlp_ratio", 4.0), "pre_norm": True,
        "act_layer": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu", "num_classes": embed_dim,
        "global_pool": "token", "norm": "layernorm"}}


def build_tower(spec: dict) -> nn.Module:
    """A timm CLIP ViT from ``tower_spec`` output, with PyTorch's default init (weights are loaded next).

    timm's own ViT init (truncated normals) is skipped (``weight_init="skip"``): every caller overwrites the weights,
    and for ViT-L/14 that init alone takes seconds on a CPU.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(spec["kwargs"], weight_init="skip")
    if spec.get("arch"):
        return timm.create_model(spec["arch"], pretrained=False, **kwargs)
    kwargs.pop("norm", None)
    # CLIP uses torch's LayerNorm (eps 1e-5), timm's ViT default is 1e-6: a 2e-4 drift if left alone.
    return VisionTransformer(norm_layer=partial(nn.LayerNorm, eps=1e-5), **kwargs)


def convert_visual(clip_state_dict: dict, tower: nn.Module) -> dict:
    """OpenAI/open_clip visual keys -> timm keys (timm's own converter, as for OpenAI ViT-B/32)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(clip_state_dict, tower)


def template_fns(templates: list[Any]) -> list:
    # open_clip formats string templates positionally; CLIP_benchmark files use the named field {c}, which
    # ``t.format(classname)`` rejects with KeyError.
    fns = []
    for t in templates:
        if callable(t):
            fns.append(t)
        else:
            fns.append(lambda c, _t=str(t): _t.replace("{c}", c) if "{c}" in _t else _t.format(c))
    return fns


CLASSES_PER_BATCH = 10  # open_clip.build_zero_shot_classifier's default batch of class names


@torch.no_grad()
def zero_shot_weights(bundle: ClipBundle, classnames: list[str], templates: list[Any],
                      device: str | torch.device = "cpu", share_ranks: bool = False) -> torch.Tensor:
    """``(num_classes, embed_dim)`` unit-norm class embeddings averaged over templates.

    ``share_ranks``: every rank of the process group calls this together (evaluation); each encodes only its own
    batches of ``CLASSES_PER_BATCH`` class names (batch ``b`` on rank ``b % W``) and the rows are gathered, so a
    1000-class x 80-template head is encoded once across the ranks, not once per rank, from the very batches one
    process encodes (same numbers, tested)."""
    import open_clip

    from ..runtime import all_gather, world_info

    if not templates:
        templates = ["a photo of a {c}."]
    rank, world = world_info() if share_ranks else (0, 1)
    groups = [list(classnames[i:i + CLASSES_PER_BATCH]) for i in range(0, len(classnames), CLASSES_PER_BATCH)]
    mine = [c for g in groups[rank::world] for c in g]
    w = None
    if mine or world == 1:  # (one process: open_clip refuses an empty class list, as it always did)
        w = open_clip.build_zero_shot_classifier(bundle.clip, bundle.tokenizer(), mine, template_fns(templates),
                                                 num_classes_per_batch=CLASSES_PER_BATCH, device=device,
                                                 use_tqdm=False).t().contiguous().float().cpu()
    if world == 1:
        return w
    parts = all_gather(w)  # rank r's rows are its batches r, r + W, ... in order
    offsets, rows = [0] * world, []
    for b, g in enumerate(groups):
        r = b % world
        rows.append(parts[r][offsets[r]:offsets[r] + len(g)])
        offsets[r] += len(g)
    return torch.cat(rows)


def image_tower(bundle: ClipBundle) -> nn.Module:
    """The CLIP's image tower as timm's CLIP ``VisionTransformer`` with its weights (``convert_visual``)."""
    tower = build_tower(tower_spec(bundle.model_name, bundle.model_cfg))
    tower.load_state_dict(convert_visual(bundle.clip.state_dict(), tower), strict=True)
    return tower


def classifier_from_clip(bundle: ClipBundle, classnames: list[str], templates: list[Any],
                         device: str | torch.device = "cpu", share_ranks: bool = False) -> ClipClassifier:
    tower = image_tower(bundle)
    head = ZeroShotHead(zero_shot_weights(bundle, classnames, templates, device=device, share_ranks=share_ranks),
                        float(bundle.clip.logit_scale.detach().exp()))
    return ClipClassifier(tower, head, pretrained_cfg_from_clip(bundle)).eval()


def text_state_dict(bundle: ClipBundle) -> dict:
    """The open_clip weights without the visual tower (what rebuilding a zero-shot head needs)."""
    return {k: v.detach().contiguous().cpu() for k, v in bundle.clip.state_dict().items()
            if not k.startswith("visual.")}


def bundle_from_text_state(model_name: str, model_cfg: dict, text_sd: dict) -> ClipBundle:
    import open_clip

    register_open_clip_config(model_name, model_cfg)
    clip = open_clip.create_model(model_name, pretrained=None)
    missing, unexpected = clip.load_state_dict(text_sd, strict=False)
    bad = [k for k in missing if not k.startswith("visual.")]
    if bad or unexpected:
        raise ValueError(f"text weights do not match {model_name}: missing {bad[:3]}, unexpected {unexpected[:3]}")
    return ClipBundle(model_name, model_cfg, clip.eval())


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

"""Run folders: ``model.safetensors`` (timm key space, LoRA merged, head included) + ``checkpoint.json``.

``checkpoint.json`` holds everything needed to rebuild the classifier without the training code: the tower spec,
the pretrained cfg, class names and templates, the open_clip config of the text side (whose weights sit in
``text.safetensors`` so heads for new class sets can be built), the resolved config, the recipe and metrics.
Every file is written atomically and weights are read with safetensors only (``tensor_io``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import read_json
from .tensor_io import (CheckpointError, atomic_write_text, check_finite, load_state_dict_checked, save_tensors,
                        sha256_file)

__all__ = ["save_run", "load_run", "load_run_meta", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def save_run(out: str | Path, model, *, tower: dict, clip_meta: dict | None, text_state: dict | None,
             classnames: list[str], templates: list[str] | None, recipe: str, config: dict,
             metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a loadable run folder for a ``ClipClassifier`` (LoRA must already be merged)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    stray = [k for k in sd if "lora_" in k or "awp_" in k]
    if stray:
        raise CheckpointError(f"refusing to save un-merged adapter weights ({stray[0]}); merge LoRA first")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"refusing to save non-finite weights in {k}")
    save_tensors(sd, out / "model.safetensors")
    if text_state is not None:
        save_tensors(text_state, out / "text.safetensors")
    meta = {
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        "architecture": {"tower": tower, "num_classes": int(model.num_classes),
                         **(model.head_spec() if hasattr(model, "head_spec")
                            else {"embed_dim": int(model.head.weight.shape[1])})},
        "pretrained_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()},
        "classnames": list(classnames),
        "templates": list(templates or []),
        "clip": clip_meta,
        "config": config,
        "metrics": metrics or {},
        "weights_sha256": sha256_file(out / "model.safetensors"),
        **(extra or {}),
    }
    atomic_write_text(out / "checkpoint.json", json.dumps(meta, indent=2, default=str) + "\n")
    return out


def load_run_meta(run: str | Path) -> dict:
    p = Path(run)
    meta_file = p / "checkpoint.json" if p.is_dir() else p.with_name("checkpoint.json")
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file}: missing; not a grace run folder")
    meta = read_json(meta_file, CheckpointError)
    for key in ("architecture", "pretrained_cfg", "classnames"):
        if key not in meta:
            raise CheckpointError(f"{meta_file}: field {key!r} is missing")
    required = (("architecture", ("tower", "num_classes")), ("pretrained_cfg", ("input_size", "mean", "std")))
    for section, keys in required:
        if not isinstance(meta[section], dict):
            raise CheckpointError(f"{meta_file}: field {section!r} must be a mapping")
        for key in keys:
            if key not in meta[section]:
                raise CheckpointError(f"{meta_file}: field '{section}.{key}' is missing")
    return meta


def load_run(run: str | Path, device: str | torch.device = "cpu", check_sha256: bool = True):
    """Rebuild the ``ClipClassifier`` of a run folder (or its ``model.safetensors``); returns ``(model, meta)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models.classifier import ClipClassifier, ZeroShotHead
    from .models.clip import build_tower

    p = Path(run)
    weights = p / "model.safetensors" if p.is_dir() else p
    meta = load_run_meta(p)
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if check_sha256 and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 differs from checkpoint.json; the file is corrupt or replaced")
    try:
        sd = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    check_finite(sd, weights)
    if meta.get("task", "classification") == "vqa":  # a VQA backbone's model (grace_plugin/vqa/backbones.py)
        from .vqa.backbones import backbone_of_run

        model = backbone_of_run(meta, weights).rebuild(meta, weights)
        missing, unexpected = load_state_dict_checked(model, sd, weights)
        if missing or unexpected:
            raise CheckpointError(f"{weights}: does not match the VQA architecture in checkpoint.json "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model.to(device).eval(), meta
    arch = meta["architecture"]
    tower = build_tower(arch["tower"])
    head_w = sd.get("head.weight")
    if head_w is None:
        raise CheckpointError(f"{weights}: no 'head.weight' tensor")
    if head_w.shape[0] != arch["num_classes"]:
        raise CheckpointError(f"{weights}: head has {head_w.shape[0]} classes but checkpoint.json says "
                              f"{arch['num_classes']}")
    model = ClipClassifier(tower, ZeroShotHead(head_w, 1.0), meta["pretrained_cfg"])
    missing, unexpected = load_state_dict_checked(model, sd, weights)
    if missing or unexpected:
        raise CheckpointError(f"{weights}: does not match the architecture in checkpoint.json "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), meta

"""Image transforms, every one derived from the model's timm ``pretrained_cfg``.

Models take [0,1] pixels and normalise inside, so these transforms never normalise: they are timm's own
``create_transform`` with an identity mean/std, which keeps resize, interpolation, crop_pct and crop_mode exactly
as timm (and RobustBench, which builds its ImageNet transform from the same cfg) would apply them.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["eval_transform", "train_transform", "data_config", "as_tensor_transform"]

_IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def data_config(pretrained_cfg: dict) -> dict:
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=dict(pretrained_cfg))


def eval_transform(pretrained_cfg: dict) -> Callable:
    from timm.data import create_transform

    cfg = data_config(pretrained_cfg)
    return create_transform(input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                            crop_pct=cfg["crop_pct"], crop_mode=cfg.get("crop_mode", "center"), **_IDENTITY)


def train_transform(pretrained_cfg: dict, augment: str = "none") -> Callable:
    """``none``: the eval transform (CLIP fine-tuning convention); ``rrc``: timm RandomResizedCrop + flip."""
    if augment == "none":
        return eval_transform(pretrained_cfg)
    if augment == "rrc":
        from timm.data import create_transform

        cfg = data_config(pretrained_cfg)
        return create_transform(input_size=cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
                                hflip=0.5, color_jitter=None, **_IDENTITY)
    raise ValueError(f"unknown augment {augment!r}; valid: none, rrc")


def as_tensor_transform(transform: Callable) -> Callable | None:
    """The same transform on decoded uint8 CHW tensors, or None when one of its steps has no tensor equivalent.

    The steps are timm's own transform objects: torchvision's ``Resize``, ``CenterCrop`` and ``Normalize`` run on
    tensors as they are (antialiased resize with torchvision's vectorised uint8 kernels, several times faster than
    PIL's), and ``ToTensor`` becomes a conversion to float in [0,1]. Decoding gives PIL's pixels exactly; resizing
    differs from PIL's by 0.2 grey levels on average, with under 1% of values more than one level apart (the two
    libraries round their resampling differently; ``tests/test_data.py`` checks the bounds). PIL-only steps (timm's
    ``RandomResizedCropAndInterpolation`` of ``augment=rrc``, ``ResizeKeepRatio``) return None: callers then decode
    with PIL.
    """
    import torchvision.transforms as T

    steps = []
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, T.ToTensor):  # also timm's MaybeToTensor, a subclass
            steps.append(T.ConvertImageDtype(torch.float32))
        elif isinstance(t, (T.Resize, T.CenterCrop, T.Normalize)) and getattr(t, "antialias", True) is not False:
            steps.append(t)
        else:
            return None
    return T.Compose(steps)

"""Image transforms, every one derived from the model's timm ``pretrained_cfg``.

Models take [0,1] pixels and normalise inside, so these transforms never normalise: they are timm's own
``create_transform`` with an identity mean/std, which keeps resize, interpolation, crop_pct and crop_mode exactly
as timm (and RobustBench, which builds its ImageNet transform from the same cfg) would apply them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from grace_plugin.errors import UsageError

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
    raise UsageError(f"data.augment: unknown augment {augment!r}; valid: none, rrc")


def as_tensor_transform(transform: Callable) -> Callable | None:
    """The same transform on decoded uint8 CHW tensors, or None when one of its steps has no tensor equivalent.

    The steps are timm's own, with their parameters: ``Resize``, ``CenterCrop`` and ``Normalize`` become their
    torchvision v2 counterparts (antialiased resize with vectorised uint8 kernels, several times faster than PIL's)
    and ``ToTensor`` a conversion to float in [0,1]; an identity ``Normalize`` is dropped. Decoding gives PIL's
    pixels exactly; resizing stays within 2 grey levels of PIL's, 0.01 levels on average (the two libraries round
    their fixed-point resampling differently; ``tests/test_data.py`` checks the bounds). PIL-only steps (timm's
    ``RandomResizedCropAndInterpolation`` of ``augment=rrc``, ``ResizeKeepRatio``) return None: callers then decode
    with PIL.
    """
    import torchvision.transforms as T
    from torchvision.transforms import v2

    steps = []
    for t in getattr(transform, "transforms", [transform]):
        if isinstance(t, T.ToTensor):  # also timm's MaybeToTensor, a subclass
            steps.append(v2.ToDtype(torch.float32, scale=True))
        elif isinstance(t, T.Resize) and t.antialias is not False:
            # v2's kernel resizes uint8 directly (v1's functional casts to float first, which is slower than PIL)
            steps.append(v2.Resize(t.size, interpolation=t.interpolation, max_size=t.max_size, antialias=True))
        elif isinstance(t, T.CenterCrop):
            steps.append(v2.CenterCrop(t.size))
        elif isinstance(t, T.Normalize):
            if any(m != 0 for m in t.mean) or any(s != 1 for s in t.std):
                steps.append(v2.Normalize(list(t.mean), list(t.std)))
        else:
            return None
    return v2.Compose(steps)

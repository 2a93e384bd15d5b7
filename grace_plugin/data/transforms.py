"""Image transforms, every one derived from the model's timm ``pretrained_cfg``.

Models take [0,1] pixels and normalise inside, so these transforms never normalise: they are timm's own
``create_transform`` with an identity mean/std, which keeps resize, interpolation, crop_pct and crop_mode exactly
as timm (and RobustBench, which builds its ImageNet transform from the same cfg) would apply them.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["eval_transform", "train_transform", "data_config"]

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

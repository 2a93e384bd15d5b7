"""The one model wrapper: a CLIP zero-shot classifier that takes [0,1] pixels.

``[0,1] image -> normalize (CLIP mean/std, buffers) -> timm CLIP ViT tower -> L2-normalize -> frozen zero-shot head
(class-prompt text embeddings) x logit scale``. The head is *not* folded into the tower's projection: CLIP
normalises features before the class matrix, and cross-entropy, attacks and AutoAttack margins depend on that
(as in CLIP's zero-shot evaluation, https://github.com/openai/CLIP). ``pretrained_cfg`` (timm's dict) drives every
transform.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageNormalizer", "ZeroShotHead", "ClipClassifier"]


class ImageNormalizer(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ZeroShotHead(nn.Module):
    """``logit_scale * f @ weight.T`` for L2-normalised features ``f``; ``weight`` rows are class embeddings."""

    def __init__(self, weight: torch.Tensor, logit_scale: float, trainable: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float(), requires_grad=trainable)
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * f @ self.weight.t().to(f.dtype)


class ClipClassifier(nn.Module):
    """CLIP image tower + zero-shot head, with normalisation inside.

    Args:
        visual: a timm ``VisionTransformer`` whose ``head`` is CLIP's visual projection (``num_classes=embed_dim``).
        head: the zero-shot head.
        pretrained_cfg: timm pretrained cfg (input size, interpolation, crop_pct, mean, std, ...).

    Shape:
        input ``[B, 3, H, W]`` in [0,1]; output logits ``[B, num_classes]``.
    """

    def __init__(self, visual: nn.Module, head: ZeroShotHead, pretrained_cfg: dict):
        super().__init__()
        self.normalize = ImageNormalizer(pretrained_cfg["mean"], pretrained_cfg["std"])
        self.visual = visual
        self.head = head
        self.pretrained_cfg = dict(pretrained_cfg, num_classes=head.num_classes)
        self.default_cfg = self.pretrained_cfg  # timm alias
        self.num_classes = head.num_classes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of [0,1] images."""
        return F.normalize(self.visual(self.normalize(x)), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(x))

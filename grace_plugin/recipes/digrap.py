"""DiGraP: directional gradient projection, the seed paper's proximity optimizer.

Paper: Huang, Tian, Maneechotesuwan, Chopra, Kira, "Directional Gradient Projection for Robust Fine-Tuning of
Foundation Models", ICLR 2025, https://arxiv.org/abs/2502.15895. Threat model: none.

Training is ``ft``'s cross-entropy; the optimizer (``grace_plugin.optim.DiGraP``, Algorithm 1) treats the task
gradient ``g1`` and the proximity gradient ``g2 = θ - θ0`` per tensor; when they conflict (``g1·g2 < 0``) it removes
``ω`` times the projection of ``g1`` on ``g2`` before the Adam moments. ``ω ∈ [0, 1]`` is trainable per tensor
(starting at 0, hyper-gradient descent with its own Adam at lr ``digrap_mu``); ``digrap_trainable=false`` fixes it at
``digrap_strength``.

Args (``DiGraPConfig``): ``digrap_mu``, ``digrap_trainable``, ``digrap_strength``, ``digrap_normalize``, the Adam
fields, ``lora_anchor``, ``lora`` and the LoRA fields. Alg. 1 has no weight decay: set ``train.weight_decay=0`` to
match it (otherwise it is applied decoupled, AdamW-style).

Example:
    grace train --recipe digrap --init runs/pretrained --data data/id --out runs/digrap --steps 200 \\
        --set train.weight_decay=0 --set recipe.digrap_mu=0.01
"""
from __future__ import annotations

from dataclasses import dataclass

from ..optim import DiGraP as DiGraPOptimizer
from .base import register_recipe
from .proximal import ProximalConfig, ProximalRecipe

__all__ = ["DiGraPConfig", "DiGraP"]


@dataclass
class DiGraPConfig(ProximalConfig):
    # no μ value in the paper text we read; ours is 1e-2, the prototype's
    # (github.com/chengyuehuang511/vlm_robustness, optimizer/pcgrad.py)
    digrap_mu: float = 1e-2
    digrap_trainable: bool = True
    digrap_strength: float = 0.0  # Alg. 1: ω_1 = 0
    # Alg. 1 applies a "Normalization" to the ω hyper-gradient, not spelled out in the text; "cosine" is our choice
    digrap_normalize: str = "cosine"


@register_recipe("digrap")
class DiGraP(ProximalRecipe):
    Config = DiGraPConfig
    optimizer_cls = DiGraPOptimizer

    def optimizer_kwargs(self) -> dict:
        c = self.cfg
        return {"mu": c.digrap_mu, "trainable": c.digrap_trainable, "strength": c.digrap_strength,
                "normalize": c.digrap_normalize}

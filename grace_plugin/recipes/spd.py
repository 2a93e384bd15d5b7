"""SPD: selective projection decay (the FRAMES-VQA optimizer "AdamH", ``optimizer/adamh.py``).

Paper: Tian, Huang, Kira, "Rethinking Weight Decay for Robust Fine-Tuning of Foundation Models", NeurIPS 2024,
https://arxiv.org/abs/2411.01713 (as used in FRAMES-VQA, https://arxiv.org/abs/2505.21755). Threat model: none.

Training is ``ft``'s cross-entropy; the optimizer (``grace_plugin.optim.SPD``) takes a plain Adam step and, on the
tensors whose condition ``g·(θ0-θ) < 0`` holds, decays the proposal towards the pre-trained weights by
``λ r (θ̃-θ0)`` with ``r = clamp((||θ̃-θ0|| - ||θ-θ0||)/||θ̃-θ0||, 0, 1)``. ``lora=true`` gives LoRA-SPD (Table 7).

Args (``SPDConfig``): ``spd_lambda`` (λ), the Adam fields, ``lora_anchor``, ``lora`` and the LoRA fields.
``train.weight_decay`` adds ordinary decoupled decay on top (set it to 0 for SPD as published).

Example:
    grace train --recipe spd --init runs/pretrained --data data/id --out runs/spd --steps 200 \\
        --set recipe.spd_lambda=1.0 --set train.weight_decay=0
"""
from __future__ import annotations

from dataclasses import dataclass

from ..optim import SPD as SPDOptimizer
from .base import register_recipe
from .proximal import ProximalConfig, ProximalRecipe

__all__ = ["SPDConfig", "SPD"]


@dataclass
class SPDConfig(ProximalConfig):
    # FRAMES-VQA (optimizer/adamh.py) passes its weight_decay as λ ("a strong penalty"); no CLIP value is published.
    # Our choice: λ = 1, the closed-form "do not drift further" point on the selected tensors.
    spd_lambda: float = 1.0


@register_recipe("spd")
class SPD(ProximalRecipe):
    Config = SPDConfig
    optimizer_cls = SPDOptimizer

    def optimizer_kwargs(self) -> dict:
        return {"lam": self.cfg.spd_lambda}

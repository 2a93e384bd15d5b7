"""TeCoA: text-guided contrastive adversarial training.

Paper: Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023,
https://arxiv.org/abs/2212.07016. Threat model: l_inf, eps 4/255 (GRACE's training/evaluation radius; TeCoA itself
trained at 1/255; the 4/255 re-run is our choice), PGD on [0,1] pixels.

One step: ``x_adv`` = PGD maximising the CE of the zero-shot logits ``s·f(x)·W_txtᵀ`` (the frozen text head; input
gradients only), then minimise the same CE on ``x_adv``. Only the image tower trains (or its LoRA factors with
``lora=true``: the LoRA-TeCoA row of GRACE Table 7); the text head stays frozen.

Args (``TeCoAConfig``): ``pgd_eps``, ``pgd_alpha``, ``pgd_steps``, ``pgd_random_start``, ``lora`` and the LoRA
fields of ``RecipeConfig``.

Example:
    grace train --recipe tecoa --init runs/pretrained --data data/id --out runs/tecoa --steps 200 \\
        --set recipe.pgd_steps=10
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .adversarial import AdvConfig, AdversarialRecipe
from .base import register_recipe

__all__ = ["TeCoAConfig", "TeCoA"]


@dataclass
class TeCoAConfig(AdvConfig):
    pass


@register_recipe("tecoa")
class TeCoA(AdversarialRecipe):
    Config = TeCoAConfig

    def adversarial_loss(self, x, x_adv, y, ctx):
        with ctx.autocast():
            logits = self.model(x_adv)
        return F.cross_entropy(logits.float(), y), {}

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forwards + k input backwards; the adversarial forward and its backward."""
        k = self.attack_passes()
        return {"forward": k + 1, "input_backward": k, "backward": 1}

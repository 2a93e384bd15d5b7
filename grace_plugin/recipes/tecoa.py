"""TeCoA: text-guided contrastive adversarial training (spec §6).

Paper: Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023,
https://arxiv.org/abs/2212.07016. Threat model: l_inf, eps 4/255 (GRACE's training/evaluation radius; TeCoA itself
trained at 1/255, spec §6 note), PGD on [0,1] pixels.

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

from .base import Recipe, RecipeConfig, StepContext, StepOutput, register_recipe
from .grace import attack_steps, pgd_attack

__all__ = ["TeCoAConfig", "TeCoA", "AdvConfig"]


@dataclass
class AdvConfig(RecipeConfig):
    """The training attack shared by the adversarial baselines (spec §1.c, §6: PGD-10, l_inf 4/255, step 1/255)."""

    pgd_eps: float = 4 / 255
    pgd_alpha: float = 1 / 255
    pgd_steps: int = 10
    pgd_random_start: bool = True


@dataclass
class TeCoAConfig(AdvConfig):
    pass


@register_recipe("tecoa")
class TeCoA(Recipe):
    Config = TeCoAConfig

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        cfg = self.cfg
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        x_adv = pgd_attack(self.model, x, y, cfg.pgd_eps, cfg.pgd_alpha, cfg.pgd_steps, cfg.pgd_random_start,
                           ctx.autocast, ctx)
        with ctx.autocast():
            logits = self.model(x_adv)
        loss = F.cross_entropy(logits.float(), y)
        return StepOutput(loss, {"loss": float(loss.detach())})

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forwards + k input backwards; the adversarial forward and its backward."""
        k = attack_steps(self.cfg.pgd_eps, self.cfg.pgd_steps)
        return {"forward": k + 1, "input_backward": k, "backward": 1}

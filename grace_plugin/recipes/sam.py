"""SAM and ASAM: sharpness-aware minimisation.

Papers: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021,
https://arxiv.org/abs/2010.01412; Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021, https://arxiv.org/abs/2102.11600. Threat model: none (clean inputs;
the worst case is over weights).

One step, two passes: ``g = ∇L(w)``; ``ε* = ρ g/||g||`` (SAM) or ``ρ T² g/||T g||``, ``T = diag(|w| + η)`` (ASAM,
``adaptive=true``); the gradient at ``w + ε*`` is computed inside ``perturbed()`` (which restores ``w`` bit for bit
on exit, never by subtraction) and returned through ``linearized_loss``: a loss whose value is ``L(w + ε*)`` and
whose backward deposits exactly ``∇L(w + ε*)``, so the trainer's single ``backward()`` contract is unchanged. The
perturbation covers the trainable parameters: the full tower and head, or the LoRA factors (+ head) with
``lora=true`` (LoRA-SAM: SAM inside GRACE's LoRA parameterisation, our baseline).

Args (``SAMConfig``): ``rho`` (SAM's default 0.05; the GRACE paper gives no SAM setting, we sweep {0.01, 0.05, 0.1}),
``adaptive`` (ASAM), ``asam_eta`` (ASAM's η, 0.01 in its code), ``lora`` and the LoRA fields.

Example:
    grace train --recipe sam --init runs/pretrained --data data/id --out runs/asam --steps 200 \\
        --set recipe.adaptive=true --set recipe.rho=0.5
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..perturbation import linearized_loss, perturbed, sam_perturbation
from .base import Recipe, RecipeConfig, StepContext, StepOutput, register_recipe

__all__ = ["SAMConfig", "SAM"]


@dataclass
class SAMConfig(RecipeConfig):
    train_head: bool = True
    rho: float = 0.05  # SAM paper default; our sweep is {0.01, 0.05, 0.1}
    adaptive: bool = False  # ASAM
    asam_eta: float = 0.01  # ASAM code: T_w = |w| + eta


@register_recipe("sam")
class SAM(Recipe):
    Config = SAMConfig

    def _loss(self, x, y, ctx):
        with ctx.autocast():
            logits = self.model(x)
        return F.cross_entropy(logits.float(), y)

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        cfg = self.cfg
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        params = self.trainable_parameters()
        loss0 = self._loss(x, y, ctx)
        g0 = torch.autograd.grad(loss0, params, allow_unused=True)
        # ε* follows the whole batch's gradient: averaged over ranks (1 process == N processes)
        g0 = ctx.all_reduce_mean([torch.zeros_like(p) if g is None else g for p, g in zip(params, g0)])
        deltas = sam_perturbation(params, g0, cfg.rho, cfg.adaptive, cfg.asam_eta)
        with perturbed(params, deltas):
            loss1 = self._loss(x, y, ctx)
            g1 = torch.autograd.grad(loss1, params, allow_unused=True)
        g1 = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g1)]
        loss = linearized_loss(loss1, params, g1)
        return StepOutput(loss, {"loss": float(loss1.detach()), "loss_clean": float(loss0.detach()),
                                 "eps_norm": float(torch.sqrt(sum((d * d).sum() for d in deltas)))})

    def pass_counts(self) -> dict[str, float]:
        """Two forwards and two backwards (at w and at w + eps*); the returned linearised loss has no model graph."""
        return {"forward": 2, "backward": 2}

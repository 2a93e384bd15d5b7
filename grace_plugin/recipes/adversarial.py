"""The training attack shared by every adversarial recipe, and the "attack, then loss on the adversarial batch" step.

``pgd_attack`` is l_inf PGD on the cross-entropy of the zero-shot logits in [0,1] pixel space (GRACE arXiv
2603.27139 Sec. 6.1 and Eq. 19: 10 steps, radius 4/255, step 1/255; TeCoA, arXiv 2212.07016, Sec. 3), run through
torchattacks with input gradients only. ``AdvConfig`` holds its four fields once for tecoa, pmg_aft, fare, grace and
grace_fast. ``AdversarialRecipe`` is the step those recipes share: move the batch, craft ``x_adv`` with ``attack``,
then ``adversarial_loss(x, x_adv, y, ctx)`` (the only method a subclass must write). FARE's inner problem is an
embedding attack, not the CE one; it keeps its own step and uses ``AdvConfig`` and ``attack_steps`` from here.

TeCoA, the plain case of that step (the CE on ``x_adv``), is registered here too.

**tecoa**: TeCoA: text-guided contrastive adversarial training.

Paper: Mao et al., "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models", ICLR 2023,
https://arxiv.org/abs/2212.07016. Threat model: l_inf, eps 4/255 (GRACE's training/evaluation radius; TeCoA itself
trained at 1/255; the 4/255 re-run is our choice), PGD on [0,1] pixels.

One step: ``x_adv`` = PGD maximising the CE of the zero-shot logits ``s·f(x)·W_txtᵀ`` (the frozen text head; input
gradients only), then minimise the same CE on ``x_adv``. Only the image tower trains (or its LoRA factors with
``lora=true``: the LoRA-TeCoA row of GRACE Table 7); the text head stays frozen.

Args (``AdvConfig``): ``pgd_eps``, ``pgd_alpha``, ``pgd_steps``, ``pgd_random_start``, ``lora`` and the LoRA
fields of ``RecipeConfig``.

Example:
    grace train --recipe tecoa --init runs/pretrained --data data/id --out runs/tecoa --steps 200 \\
        --set recipe.pgd_steps=10
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Recipe, RecipeConfig, StepContext, StepOutput, register_recipe

__all__ = ["AdvConfig", "AdversarialRecipe", "attack_steps", "pgd_attack", "TeCoA"]


@dataclass
class AdvConfig(RecipeConfig):
    """The training attack (GRACE Sec. 6.1: PGD-10, l_inf 4/255, step 1/255)."""

    pgd_eps: float = 4 / 255
    pgd_alpha: float = 1 / 255
    pgd_steps: int = 10
    pgd_random_start: bool = True  # not stated by GRACE; uniform start in the eps-ball (Madry et al., arXiv 1706.06083)


def attack_steps(eps: float, steps: int) -> int:
    """The attack steps ``pgd_attack`` (and FARE's embedding attack) actually run: none when eps or steps is 0."""
    return steps if eps > 0 and steps > 0 else 0


_PGD_FROM = None


def _pgd_from_class():
    """torchattacks' ``PGD`` whose random start is given (``start_noise``) instead of drawn from the global RNG, so
    it can come from per-sample generators (grace_plugin/rng.py); otherwise torchattacks' forward line for line
    (torchattacks/attacks/pgd.py, ``PGD.forward``, untargeted): torchattacks has no hook for the start."""
    global _PGD_FROM
    if _PGD_FROM is None:
        import torch.nn.functional as F
        import torchattacks

        class PGDFrom(torchattacks.PGD):
            start_noise: torch.Tensor | None = None

            def forward(self, images, labels):
                images = images.clone().detach().to(self.device)
                labels = labels.clone().detach().to(self.device)
                adv = images.clone().detach()
                if self.start_noise is not None:
                    adv = torch.clamp(adv + self.start_noise.to(adv), min=0, max=1).detach()
                for _ in range(self.steps):
                    adv.requires_grad = True
                    cost = F.cross_entropy(self.get_logits(adv), labels)
                    grad = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)[0]
                    adv = adv.detach() + self.alpha * grad.sign()
                    delta = torch.clamp(adv - images, min=-self.eps, max=self.eps)
                    adv = torch.clamp(images + delta, min=0, max=1).detach()
                return adv

        _PGD_FROM = PGDFrom
    return _PGD_FROM


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
               random_start: bool = True, autocast=None, ctx: StepContext | None = None) -> torch.Tensor:
    """l_inf PGD on the CE of ``model`` (GRACE Eq. 19) in [0,1] pixel space via torchattacks; parameters get no
    grads. With a trainer ``ctx`` the random start of sample ``i`` comes from ``(seed, step, global index of i)``
    (grace_plugin/rng.py): the same start whatever the number of processes the batch is split over."""
    import torchattacks

    from ..rng import per_sample_uniform

    if not attack_steps(eps, steps):
        return x.detach()
    if ctx is not None and getattr(ctx, "sample_index", None) is not None:
        atk = _pgd_from_class()(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
        atk.start_noise = per_sample_uniform(x, -eps, eps, ctx, "attack_start") if random_start else None
    else:
        atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    atk.set_device(x.device)
    with (autocast or contextlib.nullcontext)():
        return atk(x, y).detach()


class AdversarialRecipe(Recipe):
    """Base of the recipes whose step is "craft ``x_adv`` with the training attack, then a loss on it"."""

    Config = AdvConfig

    def attack_passes(self) -> int:
        """Attack steps one training step runs (each a forward and an input backward)."""
        return attack_steps(self.cfg.pgd_eps, self.cfg.pgd_steps)

    def attack(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        c = self.cfg
        return pgd_attack(self.model, x, y, c.pgd_eps, c.pgd_alpha, c.pgd_steps, c.pgd_random_start, ctx.autocast,
                          ctx)

    def adversarial_loss(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
                         ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, extra logs) from the clean batch ``x``, its adversarial ``x_adv`` and labels ``y``."""
        raise NotImplementedError

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        x_adv = self.attack(x, y, ctx)
        loss, logs = self.adversarial_loss(x, x_adv, y, ctx)
        return StepOutput(loss, {"loss": float(loss.detach()), **logs})


@register_recipe("tecoa")
class TeCoA(AdversarialRecipe):
    Config = AdvConfig

    def adversarial_loss(self, x, x_adv, y, ctx):
        with ctx.autocast():
            logits = self.model(x_adv)
        return F.cross_entropy(logits.float(), y), {}

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forwards + k input backwards; the adversarial forward and its backward."""
        k = self.attack_passes()
        return {"forward": k + 1, "input_backward": k, "backward": 1}

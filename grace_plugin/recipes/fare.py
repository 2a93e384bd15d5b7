"""FARE: unsupervised adversarial fine-tuning of the image embedding.

Paper: Schlarmann et al., "Robust CLIP: Unsupervised Adversarial Fine-Tuning of Vision Embeddings for Robust Large
Vision-Language Models", ICML 2024, https://arxiv.org/abs/2402.12336. Threat model: l_inf, eps 4/255 (FARE trains at
2/255 or 4/255), 10-step PGD, step 1/255, uniform random start, [0,1] pixels.

Objective: ``min_φ E_x max_{||z-x||_inf <= eps} ||φ(z) - φ_orig(x)||²_2`` where ``φ`` is the image embedding
*before* L2 normalisation (FARE's ``output_normalize=False``), ``φ_orig`` a frozen copy of the original tower, the
squared error summed over the embedding and averaged over the batch. Labels are not used. The inner maximisation is
``embedding_pgd_class()``, a torchattacks ``Attack`` (input gradients only). ``clean_weight`` mixes in the
clean term as in FARE's code: ``(1-w)·adv + w·clean`` (0 for FARE).

Args (``FAREConfig``): the PGD fields, ``clean_weight``, ``lora`` and the LoRA fields.

Example:
    grace train --recipe fare --init runs/pretrained --data data/id --out runs/fare --steps 200
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..rng import per_sample_uniform
from .adversarial import AdvConfig, attack_steps
from .base import FrozenOriginal, Recipe, StepContext, StepOutput, register_recipe

__all__ = ["FAREConfig", "FARE", "embedding_pgd_class", "embedding_l2", "fare_embedding"]


def fare_embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The un-normalised image embedding ``φ(x)`` of a ``ClipClassifier`` on [0,1] images."""
    return model.visual(model.normalize(x))


def embedding_l2(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared l2 distance summed over the embedding, averaged over the batch (FARE's ``l2``)."""
    return (out.float() - target.float()).pow(2).sum(dim=1).mean()


class _Embed(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return fare_embedding(self.model, x)


_EMBEDDING_PGD = None


def embedding_pgd_class():
    """``EmbeddingPGD``: l_inf PGD maximising ``||φ(z) - target||²`` (FARE's inner problem), a torchattacks
    ``Attack`` (built on first use: torchattacks is imported lazily, like every heavy dependency here).

    ``EmbeddingPGD(model, eps, alpha, steps, random_start)(x, target)`` with ``model`` a ``ClipClassifier`` and
    ``target`` the original clean embeddings ``[B, D]`` returns ``z`` in [0,1] with ``||z - x||_inf <= eps``.
    """
    global _EMBEDDING_PGD
    if _EMBEDDING_PGD is None:
        import torchattacks

        class EmbeddingPGD(torchattacks.attack.Attack):
            def __init__(self, model, eps=4 / 255, alpha=1 / 255, steps=10, random_start=True):
                super().__init__("EmbeddingPGD", _Embed(model))
                self.eps, self.alpha, self.steps, self.random_start = eps, alpha, steps, random_start
                self.ctx = None  # a trainer StepContext: the random start comes from (seed, step, sample index)
                self.supported_mode = ["default"]

            def forward(self, images, target):
                x0 = images.clone().detach().to(self.device)
                t = target.clone().detach().to(self.device)
                x = x0.clone()
                if self.random_start:  # per-sample generators under the trainer (grace_plugin/rng.py)
                    x = (x0 + per_sample_uniform(x0, -self.eps, self.eps, self.ctx, "attack_start")).clamp(0, 1)
                for _ in range(self.steps):
                    x.requires_grad_(True)
                    loss = embedding_l2(self.get_logits(x), t)  # get_logits: torchattacks' model call
                    g, = torch.autograd.grad(loss, x)
                    x = (x0 + (x.detach() + self.alpha * g.sign() - x0).clamp(-self.eps, self.eps)).clamp(0, 1)
                return x.detach()

        _EMBEDDING_PGD = EmbeddingPGD
    return _EMBEDDING_PGD


@dataclass
class FAREConfig(AdvConfig):
    clean_weight: float = 0.0  # FARE's --clean_weight (0 for FARE)


@register_recipe("fare")
class FARE(FrozenOriginal, Recipe):  # self.original: φ_orig, frozen, taken before any LoRA injection
    # no task loss: a new VQA answer head would never train (FARE's VLM use plugs the robust tower into a
    # separately trained model, arXiv 2402.12336 §4)
    tasks = ("classification",)
    Config = FAREConfig

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        cfg, model = self.cfg, self.model
        x = batch["image"].to(ctx.device)
        with torch.no_grad(), ctx.autocast():
            target = fare_embedding(self.original, x).float()
        if attack_steps(cfg.pgd_eps, cfg.pgd_steps):
            atk = embedding_pgd_class()(model, cfg.pgd_eps, cfg.pgd_alpha, cfg.pgd_steps, cfg.pgd_random_start)
            atk.set_device(x.device)
            atk.ctx = ctx
            with (ctx.autocast or contextlib.nullcontext)():
                z = atk(x, target)
        else:
            z = x
        with ctx.autocast():
            if cfg.clean_weight:
                emb_adv, emb_clean = fare_embedding(model, torch.cat([z, x])).chunk(2)
            else:
                emb_adv, emb_clean = fare_embedding(model, z), None
        loss_adv = embedding_l2(emb_adv, target)
        loss = loss_adv
        logs = {"l2_adv": float(loss_adv.detach())}
        if emb_clean is not None:
            loss_clean = embedding_l2(emb_clean, target)
            loss = (1 - cfg.clean_weight) * loss_adv + cfg.clean_weight * loss_clean
            logs["l2_clean"] = float(loss_clean.detach())
        logs["loss"] = float(loss.detach())
        return StepOutput(loss, logs)

    def pass_counts(self) -> dict[str, float]:
        """The frozen original model's forward (target); PGD: k forwards + k input backwards; the adversarial
        forward (plus the clean one when ``clean_weight`` > 0) and its backward."""
        k = attack_steps(self.cfg.pgd_eps, self.cfg.pgd_steps)
        n = 2 if self.cfg.clean_weight else 1
        return {"forward": 1 + k + n, "input_backward": k, "backward": n}

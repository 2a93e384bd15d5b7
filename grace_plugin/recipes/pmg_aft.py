"""PMG-AFT: pre-trained-model-guided adversarial fine-tuning.

Paper: Wang et al., "Pre-trained Model Guided Fine-Tuning for Zero-Shot Adversarial Robustness", CVPR 2024,
https://arxiv.org/abs/2401.04350. Threat model: l_inf, eps 4/255 (GRACE's radius), PGD on the CE of the current
model's zero-shot logits, [0,1] pixels.

Loss (weights 1 in the reference code, github.com/15520824/
Pre-trained-Model-Guided-Fine-Tuning-for-Zero-Shot-Adversarial-Robustness ``PMG_AFT.py``):
``L = CE(p_θ(x_adv), y) + w_ori·KL(p_0(x_adv) || p_θ(x_adv)) + w_nat·KL(p_θ(x) || p_θ(x_adv))`` with ``p`` the
softmax of the zero-shot logits and ``p_0`` the frozen original model (a copy taken before any LoRA injection).
KL uses ``batchmean`` like the reference code; gradients flow through both ``p_θ`` terms. ``p_0`` sees ``x_adv``
(as in ``PMG_AFT.py``); ``ori_input=clean`` is the variant some forks use.

Args (``PMGAFTConfig``): the PGD fields, ``w_ori``, ``w_nat``, ``ori_input``, ``lora`` (the LoRA analogue of
VPT-PMG-AFT, Table 7) and the LoRA fields.

Example:
    grace train --recipe pmg_aft --init runs/pretrained --data data/id --out runs/pmg_aft --steps 200
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import checked
from .adversarial import AdvConfig, AdversarialRecipe
from .base import FrozenOriginal, register_recipe

__all__ = ["PMGAFTConfig", "PMGAFT", "pmg_aft_loss"]


def pmg_aft_loss(logits_adv: torch.Tensor, logits_nat: torch.Tensor, logits_ori: torch.Tensor, y: torch.Tensor,
                 w_ori: float = 1.0, w_nat: float = 1.0) -> tuple[torch.Tensor, dict]:
    """``CE(adv) + w_ori KL(p_ori || p_adv) + w_nat KL(p_nat || p_adv)`` (KL batch-mean); returns (loss, parts)."""
    log_p_adv = F.log_softmax(logits_adv.float(), dim=1)
    ce = F.nll_loss(log_p_adv, y)
    kl_ori = F.kl_div(log_p_adv, F.softmax(logits_ori.float(), dim=1), reduction="batchmean")
    kl_nat = F.kl_div(log_p_adv, F.softmax(logits_nat.float(), dim=1), reduction="batchmean")
    return ce + w_ori * kl_ori + w_nat * kl_nat, {"ce": ce, "kl_ori": kl_ori, "kl_nat": kl_nat}


@dataclass
class PMGAFTConfig(AdvConfig):
    w_ori: float = 1.0  # weights 1 in the reference PMG_AFT.py
    w_nat: float = 1.0
    ori_input: str = checked("adv", choices=("adv", "clean"))  # PMG_AFT.py: p_0 on x_adv; "clean" for the fork variant


@register_recipe("pmg_aft")
class PMGAFT(FrozenOriginal, AdversarialRecipe):  # self.original: p_0, the frozen original model
    Config = PMGAFTConfig
    # its KL to the pre-trained model's predictions needs a pre-trained head; a VQA answer head is new
    tasks = ("classification",)

    def adversarial_loss(self, x, x_adv, y, ctx):
        cfg, model = self.cfg, self.model
        with ctx.autocast():
            logits_adv, logits_nat = model(torch.cat([x_adv, x])).chunk(2)  # one shared forward
            with torch.no_grad():
                logits_ori = self.original(x_adv if cfg.ori_input == "adv" else x)
        loss, parts = pmg_aft_loss(logits_adv, logits_nat, logits_ori, y, cfg.w_ori, cfg.w_nat)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def pass_counts(self) -> dict[str, float]:
        """PGD: k forwards + k input backwards; one forward of [x_adv; x] (2 batches) and its backward; the frozen
        original model's forward."""
        k = self.attack_passes()
        return {"forward": k + 2 + 1, "input_backward": k, "backward": 2}

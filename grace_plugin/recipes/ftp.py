"""FTP: fast trainable projection (the FRAMES-VQA optimizer "AdamP", ``optimizer/ftp.py``).

Paper: Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023,
https://arxiv.org/abs/2310.19182 (as used in FRAMES-VQA, https://arxiv.org/abs/2505.21755). Threat model: none.

Training is ``ft``'s cross-entropy; the optimizer (``grace_plugin.optim.FTP``) projects every row of each tensor
back into an l1 ball of learned radius γ around the pre-trained weights after each AdamW proposal.

Args (``FTPConfig``): ``ftp_k`` (annealing of positive γ hyper-gradients), ``ftp_mu`` (γ's learning rate),
``gamma_init``, the Adam fields, ``lora_anchor``, ``lora`` and the LoRA fields. ``train.lr`` and
``train.weight_decay`` feed the AdamW proposal.

Example:
    grace train --recipe ftp --init runs/pretrained --data data/id --out runs/ftp --steps 200 --set train.lr=3e-5
"""
from __future__ import annotations

from dataclasses import dataclass

from ..optim import FTP as FTPOptimizer
from .base import register_recipe
from .proximal import ProximalConfig, ProximalRecipe

__all__ = ["FTPConfig", "FTP"]


@dataclass
class FTPConfig(ProximalConfig):
    ftp_k: float = 0.5  # FRAMES-VQA optimizer/ftp.py: adamp_k, e.g. 0.5
    ftp_mu: float = 1e-2  # FRAMES-VQA optimizer/ftp.py: internal Adam lr 1e-2
    gamma_init: float = 1e-8  # FRAMES-VQA optimizer/ftp.py
    # With γ starting at 1e-8, a zero anchor would project a LoRA A factor (random init) to ~0 on the first step and
    # freeze the adapter; anchor LoRA factors at their init instead (B starts at 0 either way).
    lora_anchor: str = "init"


@register_recipe("ftp")
class FTP(ProximalRecipe):
    Config = FTPConfig
    optimizer_cls = FTPOptimizer

    def optimizer_kwargs(self) -> dict:
        return {"k": self.cfg.ftp_k, "mu": self.cfg.ftp_mu, "gamma_init": self.cfg.gamma_init}

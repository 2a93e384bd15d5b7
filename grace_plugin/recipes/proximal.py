"""The optimizer-defined recipes (FTP, SPD, DiGraP): the step is ``ft``'s cross-entropy and the recipe *is* its
optimizer (``create_optimizer``, from ``grace_plugin.optim``), each keeping the weights near the pre-trained ones
θ0 in its own way; ``train.opt`` is not used by them. One file for the family: they differ only in the optimizer
and its options (``ProximalRecipe.options``: optimizer argument -> config field).

**ftp**: FTP: fast trainable projection (the FRAMES-VQA optimizer "AdamP", ``optimizer/ftp.py``).

Paper: Tian et al., "Fast Trainable Projection for Robust Fine-Tuning", NeurIPS 2023,
https://arxiv.org/abs/2310.19182 (as used in FRAMES-VQA, https://arxiv.org/abs/2505.21755). Threat model: none.

Training is ``ft``'s cross-entropy; the optimizer (``grace_plugin.optim.FTP``) projects every row of each tensor
back into an l1 ball of learned radius γ around the pre-trained weights after each AdamW proposal.

Args (``FTPConfig``): ``ftp_k`` (annealing of positive γ hyper-gradients), ``ftp_mu`` (γ's learning rate),
``gamma_init``, the Adam fields, ``lora_anchor``, ``lora`` and the LoRA fields. ``train.lr`` and
``train.weight_decay`` feed the AdamW proposal.

Example:
    grace train --recipe ftp --init runs/pretrained --data data/id --out runs/ftp --steps 200 --set train.lr=3e-5

**spd**: SPD: selective projection decay (the FRAMES-VQA optimizer "AdamH", ``optimizer/adamh.py``).

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

**digrap**: DiGraP: directional gradient projection, the seed paper's proximity optimizer.

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

from ..config import checked
from ..optim import FTP as FTPOptimizer, SPD as SPDOptimizer, DiGraP as DiGraPOptimizer
from .base import Recipe, RecipeConfig, register_recipe

__all__ = ["ProximalConfig", "ProximalRecipe", "FTPConfig", "FTP", "SPDConfig", "SPD", "DiGraPConfig", "DiGraP"]


@dataclass
class ProximalConfig(RecipeConfig):
    train_head: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    # FRAMES-VQA's runners/runner_robust_ft.py anchors LoRA factors at zero (regularise the adapter) and full
    # weights at θ0
    lora_anchor: str = checked("zero", choices=("zero", "init"))


class ProximalRecipe(Recipe):
    Config = ProximalConfig
    optimizer_cls = None  # set by subclasses
    options: dict[str, str] = {}  # the optimizer's own arguments: argument name -> config field

    def optimizer_kwargs(self) -> dict:
        return {arg: getattr(self.cfg, name) for arg, name in self.options.items()}

    def create_optimizer(self, params, cfg):
        lora_ids = {id(p) for n, p in self.model.named_parameters() if "lora_" in n}
        groups = [{"params": [p for p in params if id(p) not in lora_ids], "anchor": "init"},
                  {"params": [p for p in params if id(p) in lora_ids], "anchor": self.cfg.lora_anchor}]
        groups = [g for g in groups if g["params"]]
        self.optimizer = self.optimizer_cls(groups, lr=cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2),
                                            eps=self.cfg.adam_eps, weight_decay=cfg.weight_decay,
                                            **self.optimizer_kwargs())
        return self.optimizer

    def after_step(self, batch, ctx) -> dict[str, float]:
        opt = getattr(self, "optimizer", None)
        return opt.stats() if opt is not None else {}


@dataclass
class FTPConfig(ProximalConfig):
    ftp_k: float = 0.5  # FRAMES-VQA optimizer/ftp.py: adamp_k, e.g. 0.5
    ftp_mu: float = 1e-2  # FRAMES-VQA optimizer/ftp.py: internal Adam lr 1e-2
    gamma_init: float = 1e-8  # FRAMES-VQA optimizer/ftp.py
    # With γ starting at 1e-8, a zero anchor would project a LoRA A factor (random init) to ~0 on the first step and
    # freeze the adapter; anchor LoRA factors at their init instead (B starts at 0 either way).
    lora_anchor: str = checked("init", choices=("zero", "init"))


@register_recipe("ftp")
class FTP(ProximalRecipe):
    Config = FTPConfig
    options = {"k": "ftp_k", "mu": "ftp_mu", "gamma_init": "gamma_init"}
    optimizer_cls = FTPOptimizer


@dataclass
class SPDConfig(ProximalConfig):
    # FRAMES-VQA (optimizer/adamh.py) passes its weight_decay as λ ("a strong penalty"); no CLIP value is published.
    # Our choice: λ = 1, the closed-form "do not drift further" point on the selected tensors.
    spd_lambda: float = 1.0


@register_recipe("spd")
class SPD(ProximalRecipe):
    Config = SPDConfig
    options = {"lam": "spd_lambda"}
    optimizer_cls = SPDOptimizer


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
    options = {"mu": "digrap_mu", "trainable": "digrap_trainable", "strength": "digrap_strength",
               "normalize": "digrap_normalize"}
    optimizer_cls = DiGraPOptimizer

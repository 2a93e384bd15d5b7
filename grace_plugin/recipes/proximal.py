"""Shared base of the optimizer-defined recipes (FTP, SPD, DiGraP): the step is ``ft``'s cross-entropy,
the recipe *is* its optimizer (``create_optimizer``); ``train.opt`` is not used by them."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Recipe, RecipeConfig

__all__ = ["ProximalConfig", "ProximalRecipe"]


@dataclass
class ProximalConfig(RecipeConfig):
    train_head: bool = True
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    # FRAMES-VQA's runners/runner_robust_ft.py anchors LoRA factors at zero (regularise the adapter) and full
    # weights at θ0
    lora_anchor: str = "zero"


class ProximalRecipe(Recipe):
    Config = ProximalConfig
    optimizer_cls = None  # set by subclasses

    def __init__(self, model, cfg):
        if cfg.lora_anchor not in ("zero", "init"):
            raise ValueError(f"{self.name}: recipe.lora_anchor must be zero|init, got {cfg.lora_anchor!r}")
        super().__init__(model, cfg)

    def optimizer_kwargs(self) -> dict:
        return {}

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

"""Vanilla fine-tuning: end-to-end cross-entropy from the zero-shot head (WiSE-FT convention).

Paper: Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, https://arxiv.org/abs/2109.01903
(the FT baseline and its head initialisation). Threat model: none (clean training).

Args (``FTConfig``): ``train_head`` (default True: the head starts at the zero-shot weights and trains),
``lora`` (``LoRA-FT`` of GRACE Table 7) and the LoRA fields of ``RecipeConfig``.

Example:
    grace train --recipe ft --init runs/pretrained --data data/id --out runs/ft --steps 200
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Recipe, RecipeConfig, register_recipe


@dataclass
class FTConfig(RecipeConfig):
    train_head: bool = True


@register_recipe("ft")
class FT(Recipe):
    Config = FTConfig

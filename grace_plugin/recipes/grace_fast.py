"""GRACE with a one-step training attack: the cheaper schedule (spec §1.d "Cost").

The paper reports GRACE at about 5x the cost of vanilla fine-tuning (spec §1.d, [PN]/[KB]), which its PGD-10
training attack cannot reach: ``bench/step_cost.py`` puts full GRACE at ~15-20x an FT step, most of it the ten
attack passes. This schedule keeps everything else of GRACE (LoRA, LAR-AWP with the curvature curriculum, Gram
volume) and replaces PGD-10 by one random-start step of size 1.25 eps, the "fast adversarial training" attack of
Wong, Rice and Kolter (ICLR 2020, https://arxiv.org/abs/2001.03994). That paper's caveat applies: single-step
training can overfit catastrophically (robust accuracy against multi-step attacks collapsing late in training);
evaluate with APGD-CE, as ``grace eval`` does, not with the training attack.

Threat model: l_inf, eps 4/255 (training FGSM with random start, step 5/255; evaluation APGD-CE).
Args: those of ``GraceConfig``; only the attack defaults differ (``pgd_steps`` 1, ``pgd_alpha`` 1.25 * 4/255).
Step cost and testbed effect: README "Step cost".

Example:
    grace train --recipe grace_fast --init runs/pretrained --data data/id --out runs/grace_fast --steps 300
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_recipe
from .grace import Grace, GraceConfig

__all__ = ["GraceFastConfig", "GraceFast"]


@dataclass
class GraceFastConfig(GraceConfig):
    pgd_steps: int = 1  # one attack step instead of PGD-10 (the cheaper schedule, spec §1.d "Cost")
    pgd_alpha: float = 1.25 * 4 / 255  # Wong et al. 2020: step 1.25 eps from a random start
    pgd_random_start: bool = True  # required: without it a single step is FGSM, which overfits sooner


@register_recipe("grace_fast")
class GraceFast(Grace):
    Config = GraceFastConfig

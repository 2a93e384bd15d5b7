"""WiSE-FT: fine-tune, then interpolate with the zero-shot weights.

Paper: Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, https://arxiv.org/abs/2109.01903.
Threat model: none (clean training).

Training is ``ft`` (end-to-end CE from the zero-shot head). The zero-shot weights are kept (CPU copy taken before
any LoRA injection) and ``export_model`` returns ``θ_α = (1-α) θ_zs + α θ_ft`` over every tensor, head included
(``grace_plugin.weightspace.interpolate_state_dicts``). To trace the ID/OOD frontier, train once with
``recipe.alpha=1`` (or use an ``ft`` run) and call ``weightspace.wise_ft_sweep`` with the zero-shot classifier and
a list of alphas, or ``grace wise-ft-sweep``.

Args (``WiseFTConfig``): ``alpha`` (mixing coefficient of the exported model, 0 = zero-shot, 1 = fine-tuned),
``lora`` and the LoRA fields of ``RecipeConfig``.

Example:
    grace train --recipe wise_ft --init runs/pretrained --data data/id --out runs/wise_ft --steps 200 \\
        --set recipe.alpha=0.5
"""
from __future__ import annotations

from dataclasses import dataclass

from ..weightspace import interpolate_state_dicts
from ..config import checked
from .base import Recipe, RecipeConfig, register_recipe

__all__ = ["WiseFTConfig", "WiseFT"]


@dataclass
class WiseFTConfig(RecipeConfig):
    train_head: bool = True
    alpha: float = checked(0.5, ge=0, le=1)  # WiSE-FT (arXiv 2109.01903) uses α = 0.5 as its default


@register_recipe("wise_ft")
class WiseFT(Recipe):
    Config = WiseFTConfig

    def __init__(self, model, cfg: WiseFTConfig):
        # Snapshot before LoRA injection: same keys as the merged export. Re-derivable from --init, so not in the
        # resume state.
        self.zero_shot_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        super().__init__(model, cfg)

    def export_model(self):
        model = super().export_model()
        start = self.zero_shot_state
        if getattr(model, "head_is_new", False):  # a new head (VQA) has no zero-shot value: keep the fine-tuned one
            start = {k: (model.state_dict()[k] if k.startswith("head.") else v) for k, v in start.items()}
        mixed = interpolate_state_dicts(start, model.state_dict(), self.cfg.alpha)
        model.load_state_dict(mixed, strict=True)
        return model

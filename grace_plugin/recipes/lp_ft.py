"""LP-FT: linear probe, then full fine-tuning.

Paper: Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022,
https://arxiv.org/abs/2202.10054. Threat model: none (clean training).

Stage 1 (the first ``lp_steps`` optimizer steps, or ``lp_fraction`` of the run): only the head trains, on frozen
features (the tower's forward runs without a graph, so the tower gets no gradient and AdamW skips it). Stage 2: the
tower (or its LoRA factors with ``lora=true``) and the head train end to end from the probed head.

Args (``LPFTConfig``): ``lp_steps`` (stage-1 length; None: ``lp_fraction`` of the run), ``lp_fraction``,
``lora`` and the LoRA fields of ``RecipeConfig``. The head starts at the zero-shot weights (the LP-FT paper trains
the probe from scratch by logistic regression; our choice: the zero-shot head, the WiSE-FT/FLYP convention
and a better start than random).

Example:
    grace train --recipe lp_ft --init runs/pretrained --data data/id --out runs/lp_ft --steps 200 \\
        --set recipe.lp_fraction=0.3
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import checked
from .base import Recipe, RecipeConfig, StepContext, StepOutput, register_recipe

__all__ = ["LPFTConfig", "LPFT"]


@dataclass
class LPFTConfig(RecipeConfig):
    train_head: bool = checked(True, choices=(True,))  # stage 1 trains the head
    lp_steps: int | None = None  # stage-1 steps; None: lp_fraction * total steps
    # LP-FT (arXiv 2202.10054) trains the probe to convergence; no step split is stated for CLIP.
    # Our default: half the budget
    lp_fraction: float = checked(0.5, ge=0, le=1)


@register_recipe("lp_ft")
class LPFT(Recipe):
    Config = LPFTConfig

    def probe_steps(self, total_steps: int) -> int:
        if self.cfg.lp_steps is not None:
            return int(self.cfg.lp_steps)
        return int(self.cfg.lp_fraction * total_steps)

    def in_probe_stage(self, ctx: StepContext) -> bool:
        return ctx.step < self.probe_steps(ctx.total_steps)

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        probe = self.in_probe_stage(ctx)
        with ctx.autocast():
            if probe:
                with torch.no_grad():  # frozen features: no tower graph at all
                    f = self.model.encode(x)
                logits = self.model.head(f.float())
            else:
                logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        return StepOutput(loss, {"loss": float(loss.detach()), "stage": 1.0 if probe else 2.0})

    def pass_counts(self) -> dict[str, float]:
        """Stage 2 (end to end), the stage that dominates a run; a stage-1 step has no tower backward."""
        return {"forward": 1, "backward": 1}

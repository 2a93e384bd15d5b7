"""FLYP: fine-tune like you pretrain.

Paper: Goyal et al., "Finetune like you pretrain: Improved finetuning of zero-shot vision models", CVPR 2023,
https://arxiv.org/abs/2212.00638. Threat model: none (clean training).

One step: each image is paired with a class prompt ``template(classname[y])`` (template sampled uniformly per image,
as FLYP does), and the symmetric CLIP InfoNCE (``open_clip.loss.ClipLoss``) is minimised between the batch's image
embeddings (our timm tower) and text embeddings (open_clip's text tower), with CLIP's trainable logit scale. Both
encoders train (the image tower or its LoRA factors; the text tower in full unless ``train_text=false``). Same-class
images in a batch are false negatives, as in FLYP. At export the zero-shot head is rebuilt from the *fine-tuned*
text encoder and logit scale, and ``fine_tune`` saves the fine-tuned text tower as ``text.safetensors`` (so heads for
OOD class sets come from it too, FLYP's evaluation).

The text side arrives through the ``TextSide`` hook: ``create_recipe("flyp", model, cfg, text=TextSide(bundle,
classnames, templates))`` (``fine_tune`` does this for every run); ``bundle.clip`` is trained in place.

Args (``FLYPConfig``): ``train_text``, ``train_logit_scale``, ``lora`` and the LoRA fields.

Example:
    grace train --recipe flyp --init runs/pretrained --data data/id --out runs/flyp --steps 200 --set train.lr=1e-5
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import checked
from ..models.classifier import ZeroShotHead
from ..models.clip import template_fns, zero_shot_weights
from ..rng import per_sample_randint
from .base import Recipe, RecipeConfig, StepContext, StepOutput, TextSide, register_recipe

__all__ = ["FLYPConfig", "FLYP"]


@dataclass
class FLYPConfig(RecipeConfig):
    train_head: bool = checked(False, choices=(False,))  # the head is rebuilt from the fine-tuned text tower at export
    train_text: bool = True  # FLYP (arXiv 2212.00638) trains both encoders
    train_logit_scale: bool = True  # FLYP continues CLIP's pretraining objective, temperature included


@register_recipe("flyp")
class FLYP(Recipe):
    Config = FLYPConfig
    uses_text = True
    tasks = ("classification",)  # its contrastive loss is over the class prompts

    def __init__(self, model, cfg: FLYPConfig, text: TextSide | None = None):
        if text is None:
            raise ValueError("flyp needs the CLIP text tower: create_recipe('flyp', model, cfg, text=TextSide(bundle, "
                             "classnames, templates)) (fine_tune passes it)")
        if len(text.classnames) != model.head.num_classes:
            raise ValueError(f"flyp: {len(text.classnames)} class names for a {model.head.num_classes}-class head")
        super().__init__(model, cfg)
        from open_clip.loss import ClipLoss

        self.text = text
        self.clip = text.bundle.clip
        for n, p in self.clip.named_parameters():
            p.requires_grad_(cfg.train_text and not n.startswith("visual.") and n != "logit_scale")
        self.clip.logit_scale.requires_grad_(cfg.train_logit_scale)
        self.clip.visual.eval()  # unused: the image side is the timm tower in self.model
        templates = template_fns(list(text.templates) or ["a photo of a {c}."])
        tok = text.bundle.tokenizer()
        # [C, T, L] token ids of every class prompt, tokenised once
        self.tokens = torch.stack([tok([t(c) for t in templates]) for c in text.classnames])
        self.loss_fn = ClipLoss()

    def text_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.clip.parameters() if p.requires_grad]

    def trainable_parameters(self):
        return super().trainable_parameters() + self.text_parameters()

    def to(self, device):
        super().to(device)
        self.clip.to(device)
        self.tokens = self.tokens.to(device)
        return self

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        tokens = self.tokens.to(ctx.device)
        t_idx = per_sample_randint(tokens.shape[1], y.shape[0], tokens.device, ctx, "flyp_template")
        self.clip.train()
        self.clip.visual.eval()
        with ctx.autocast():
            img = self.model.encode(x)
            txt = F.normalize(self.clip.encode_text(tokens[y.to(tokens.device), t_idx]), dim=-1)
        scale = self.clip.logit_scale.exp()
        if ctx.world != self.loss_fn.world_size:
            # the InfoNCE couples the whole batch: gather every rank's features, with gradients (open_clip's
            # gather_with_grad), so N processes compute the loss of the global batch, as 1 process does
            from open_clip.loss import ClipLoss

            self.loss_fn = ClipLoss(gather_with_grad=ctx.world > 1, rank=torch.distributed.get_rank()
                                    if ctx.world > 1 else 0, world_size=ctx.world)
        loss = self.loss_fn(img.float(), txt.float(), scale.float())
        return StepOutput(loss, {"loss": float(loss.detach()), "logit_scale": float(scale.detach())})

    # the text tower is outside self.model: carry its trainable weights for resume
    def state_dict(self) -> dict:
        return {"text": {n: p.detach().cpu().clone() for n, p in self.clip.named_parameters() if p.requires_grad}}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.clip.named_parameters())
        with torch.no_grad():
            for n, t in state.get("text", {}).items():
                params[n].copy_(t)

    def export_model(self):
        model = super().export_model()
        self.clip.eval()
        device = next(self.clip.parameters()).device
        w = zero_shot_weights(self.text.bundle, self.text.classnames, list(self.text.templates), device=device)
        model.head = ZeroShotHead(w, float(self.clip.logit_scale.detach().exp())).to(model.head.weight.device)
        return model

"""Recipe registry and base class.

A recipe owns *what one training step computes* (losses, attacks, perturbations) and which parameters train; the
trainer owns the loop (device, precision, optimizer, schedule, accumulation, checkpoints). Every recipe is a class
registered with ``@register_recipe("name")`` carrying a ``Config`` dataclass; the registry drives the CLI and the
parametrized tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import validate
from ..errors import GraceError
from ..registries import Registry

__all__ = ["RecipeConfig", "Recipe", "FrozenOriginal", "StepContext", "StepOutput", "batch_feature_spread", "TextSide",
           "register_recipe", "create_recipe", "list_recipes", "get_recipe_class", "UnknownRecipeError"]


class UnknownRecipeError(GraceError, KeyError):
    pass


@dataclass
class RecipeConfig:
    """Fields every recipe understands."""

    lora: bool = False  # train LoRA adapters instead of full weights ("LoRA-FT" rows of Table 7)
    lora_rank: int = 64  # GRACE (arXiv 2603.27139) Table 10: r = 64 (as quoted by github.com/amashkk/grace)
    lora_alpha: float = 128.0  # not stated by the paper; our choice 2r, as github.com/amashkk/grace
    lora_targets: list[str] = field(default_factory=lambda: ["blocks.*.attn.qkv", "blocks.*.attn.proj"])
    lora_split_qkv: bool = True  # separate q/k/v factors as PEFT's q/k/v adapters
    # with LoRA, vision-tower parameters trained in full beside the adapters (globs over their names, e.g.
    # "patch_embed.*"): PEFT's ``modules_to_save``. Not in the paper (its LoRA trains the adapters only).
    lora_modules_to_save: list[str] = field(default_factory=list)
    # (target modules are not stated by the paper; ours follow github.com/amashkk/grace)
    train_head: bool = False  # the zero-shot head stays frozen unless a recipe says otherwise


@dataclass
class StepContext:
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    step: int = 0
    total_steps: int = 1
    seed: int = 0
    # global indices of this rank's samples within the step (all micro-batches of all ranks): per-sample randomness
    # comes from (seed, step, index) (grace_plugin/rng.py); None outside the trainer (the global RNG is used)
    sample_index: torch.Tensor | None = None
    world: int = 1

    def all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average ``tensors`` over ranks (a recipe statistic of the whole batch, e.g. an ascent gradient); the
        identity for one process."""
        tensors = list(tensors)
        if self.world == 1 or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        out, off = [], 0
        for t in tensors:
            out.append(flat[off:off + t.numel()].view_as(t).to(t.dtype))
            off += t.numel()
        return out


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class TextSide:
    """The open_clip text side a recipe may need (FLYP trains it): the CLIP bundle and the class prompts.

    Passed by ``create_recipe(..., text=TextSide(...))`` only to recipes whose class sets ``uses_text = True``;
    ``fine_tune`` always offers it. A recipe that trains ``bundle.clip`` in place changes what ``fine_tune`` saves as
    ``text.safetensors`` (heads for new class sets then come from the fine-tuned text encoder).
    """

    bundle: object  # grace_plugin.models.clip.ClipBundle
    classnames: list[str]
    templates: list[str] = field(default_factory=list)


_RECIPES: Registry[type[Recipe]] = Registry("recipe", UnknownRecipeError)


def register_recipe(name: str):
    def named(cls):
        cls.name = name
        return cls

    return _RECIPES.register(name, named)


def list_recipes() -> list[str]:
    return _RECIPES.names()


def get_recipe_class(name: str) -> type[Recipe]:
    return _RECIPES.get(name)


def create_recipe(name: str, model: nn.Module, cfg: RecipeConfig | None = None,
                  text: TextSide | None = None) -> Recipe:
    """Build recipe ``name`` on ``model``; ``text`` reaches only recipes with ``uses_text`` (e.g. ``flyp``)."""
    cls = get_recipe_class(name)
    cfg = cfg if cfg is not None else cls.Config()
    if cls.uses_text:
        return cls(model, cfg, text=text)
    return cls(model, cfg)


@torch.no_grad()
def batch_feature_spread(model: nn.Module, x: torch.Tensor, autocast=contextlib.nullcontext,
                         world: int = 1) -> float | None:
    """Mean cosine between the features of different images of ``x`` (on every rank: the sums are all-reduced),
    ``losses.feature_spread``; near 1 the model is collapsing. None for a model without ``encode``. The trainer
    logs it on log steps (one forward of the step's last micro-batch, after the update)."""
    from ..losses import feature_sums, spread_from_sums

    if not hasattr(model, "encode"):
        return None
    with autocast():
        total, n = feature_sums(model.encode(x))
    if world > 1:
        import torch.distributed as dist

        buf = torch.cat([total, total.new_tensor([float(n)])])
        dist.all_reduce(buf)
        total, n = buf[:-1], int(round(float(buf[-1])))
    return spread_from_sums(total, n)


class Recipe:
    """Base: plain cross-entropy on the trainable parameters (full weights, or LoRA when ``cfg.lora``)."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[RecipeConfig]] = RecipeConfig
    uses_text: ClassVar[bool] = False  # True: __init__ takes text=TextSide (the open_clip text tower)
    # How the trainer averages gradients over ranks: "overlap" launches bucketed all-reduces from gradient hooks while
    # the trainer's backward runs (DDP-style); "oneshot" all-reduces every gradient after the step's backwards. Hooks
    # see only gradients *accumulated into .grad*, and every recipe here deposits its parameter gradients through the
    # trainer's one backward (attacks and ascent steps use torch.autograd.grad, which does not touch .grad), so all
    # overlap; a recipe that writes .grad itself must declare "oneshot".
    grad_sync: ClassVar[str] = "overlap"
    # the tasks (grace_plugin/tasks.py) the recipe can train: every recipe whose loss is the model's cross-entropy
    # runs on VQA unchanged (the soft answer target, the questions bound around the step)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "vqa")

    def __init__(self, model: nn.Module, cfg: RecipeConfig):
        from ..models.lora import inject_lora

        validate(cfg, prefix="recipe.")  # the config's declared constraints (grace_plugin/config.py)
        self.model = model
        self.cfg = cfg
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.lora:
            try:
                inject_lora(model.visual, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_split_qkv,
                            awp_rank=self.awp_rank())
            except ValueError as e:  # the globs name another architecture's layers: say which this one has
                from ..config import ConfigError

                hint = getattr(model, "lora_targets_hint", None)
                raise ConfigError(f"recipe.lora_targets: {e}" + (f"; this model's: {hint}" if hint else "")) from None
            if cfg.lora_modules_to_save:
                import fnmatch

                saved = [p for n, p in model.visual.named_parameters()
                         if any(fnmatch.fnmatchcase(n, g) for g in cfg.lora_modules_to_save)]
                if not saved:
                    from ..config import ConfigError

                    raise ConfigError(f"recipe.lora_modules_to_save: {cfg.lora_modules_to_save} matches no parameter "
                                      "of the vision tower")
                for p in saved:
                    p.requires_grad_(True)
        else:
            for p in model.visual.parameters():
                p.requires_grad_(True)
            # CLIP's visual projection has no bias (timm's converter adds a zero one): keeping it zero keeps every
            # checkpoint exactly exportable to open_clip (registry.publish.export_open_clip).
            if getattr(getattr(model.visual, "head", None), "bias", None) is not None:
                model.visual.head.bias.requires_grad_(False)
        # a new head (a VQA answer head) has no pre-trained value to keep: it trains in every recipe
        for p in model.head.parameters():
            p.requires_grad_(bool(cfg.train_head) or bool(getattr(model, "head_is_new", False)))
        # what a model says no output depends on (a CoCa's contrastive side): never trained
        for p in getattr(model, "untrained_parameters", list)():
            p.requires_grad_(False)

    def awp_rank(self) -> int:
        return 0

    # ------------------------------------------------------------------ interface used by the trainer
    def to(self, device: torch.device) -> Recipe:
        """Move the model and any module the recipe owns (frozen originals, text towers) to ``device``."""
        self.model.to(device)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def create_optimizer(self, params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
        """The optimizer for ``params`` from ``TrainConfig`` ``cfg``: timm's factory unless the recipe *is* an
        optimizer (FTP, SPD, DiGraP override this)."""
        from timm.optim import create_optimizer_v2

        return create_optimizer_v2(params, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def training_step(self, batch: dict, ctx: StepContext) -> StepOutput:
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        with ctx.autocast():
            logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        return StepOutput(loss, {"loss": float(loss.detach())})

    def after_step(self, batch: dict, ctx: StepContext) -> dict[str, float]:
        """Called after each optimizer step (e.g. curvature updates); returns extra logs."""
        return {}

    def pass_counts(self) -> dict[str, float] | None:
        """Passes over one batch that one step must do (``bench/step_cost.py``'s floor): ``forward``,
        ``backward`` (to the trainable parameters) and ``input_backward`` (to the input only, as an attack does);
        None when not declared."""
        return {"forward": 1, "backward": 1} if type(self).training_step is Recipe.training_step else None

    def summary(self) -> dict:
        """What the recipe did over the run, beyond the loss (e.g. GRACE's rank changes); saved in
        checkpoint.json under ``metrics.recipe``."""
        return {}

    def state_dict(self) -> dict:
        """Recipe state beyond the model weights (for resume)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def export_model(self) -> nn.Module:
        """The deployable classifier: LoRA merged into plain timm Linear layers."""
        from ..models.lora import merge_lora

        merge_lora(self.model.visual)
        return self.model


class FrozenOriginal:
    """Mixin for recipes that compare with the model as it was (FARE's φ_orig, PMG-AFT's p_0): ``self.original`` is a
    frozen copy in eval mode, taken before the recipe changes anything (LoRA injection included), and moves with
    ``to``. List it before ``Recipe``: ``class FARE(FrozenOriginal, Recipe)``."""

    def __init__(self, model, cfg):
        import copy

        self.original = copy.deepcopy(model).eval()
        for p in self.original.parameters():
            p.requires_grad_(False)
        super().__init__(model, cfg)

    def to(self, device):
        super().to(device)
        self.original.to(device)
        return self

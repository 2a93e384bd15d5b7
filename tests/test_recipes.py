"""Registry-driven: every registered recipe gets these tests without editing this file."""
import pytest
import torch

from grace_plugin.finetune import build_config
from grace_plugin.recipes import StepContext, create_recipe, list_recipes
from grace_plugin.recipes.adversarial import pgd_attack

TINY = {"lora_rank": 4, "lora_alpha": 8.0}


def _recipe_cfg(name):
    from grace_plugin.recipes import get_recipe_class

    fields = get_recipe_class(name).Config.__dataclass_fields__
    overrides = {k: v for k, v in TINY.items() if k in fields}
    if "pgd_steps" in fields:
        overrides["pgd_steps"] = 2
    return build_config(name, overrides={"recipe": overrides}).recipe


def _text_side(tiny_clip_dir, tiny_world):
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.models.clip import load_clip
    from grace_plugin.recipes import TextSide

    shards = open_shard_set(tiny_world / "id", split="train")
    return TextSide(load_clip(tiny_clip_dir), shards.classnames, shards.templates)


@pytest.mark.parametrize("name", list_recipes())
def test_one_step(name, tiny_classifier, tiny_batch, tiny_clip_dir, tiny_world):
    torch.manual_seed(0)
    rec = create_recipe(name, tiny_classifier, _recipe_cfg(name), text=_text_side(tiny_clip_dir, tiny_world))
    trainable = rec.trainable_parameters()
    assert trainable, "a recipe must train something"
    frozen_before = {n: p.detach().clone() for n, p in tiny_classifier.named_parameters() if not p.requires_grad}
    out = rec.training_step(tiny_batch, StepContext(device=torch.device("cpu")))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable_ids = {id(p) for p in trainable}
    for n, p in tiny_classifier.named_parameters():
        if id(p) in trainable_ids:
            assert p.grad is not None, f"{name}: trainable {n} got no gradient"
        else:
            assert p.grad is None, f"{name}: frozen {n} got a gradient"
    for n, p in tiny_classifier.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{name}: frozen {n} changed during the step"
    rec.after_step(tiny_batch, StepContext(device=torch.device("cpu")))
    exported = rec.export_model()
    assert not any("lora_" in k for k in exported.state_dict())


def test_pgd_stays_in_ball_and_range(tiny_classifier, tiny_batch):
    x, y = tiny_batch["image"], tiny_batch["label"]
    eps = 4 / 255
    x_adv = pgd_attack(tiny_classifier, x, y, eps, 1 / 255, 5)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(tiny_classifier(x_adv), y) >= loss(tiny_classifier(x), y)
    assert all(p.grad is None for p in tiny_classifier.parameters())  # the attack leaves no parameter grads


def test_grace_curvature_allocation_and_awp(tiny_classifier, tiny_batch):
    """After a curvature update the ranks follow the percentile rule and the AWP branch perturbs active layers."""
    import numpy as np

    cfg = _recipe_cfg("grace")
    cfg.curvature_interval = 1
    rec = create_recipe("grace", tiny_classifier, cfg)
    ctx = StepContext(device=torch.device("cpu"), step=0)
    assert set(rec.ranks.values()) == {0}  # Alg. 1 l.2
    logs = rec.after_step(tiny_batch, ctx)
    curv = rec.curvature
    lo, hi = np.percentile(list(curv.values()), 20), np.percentile(list(curv.values()), 80)
    for n, v in curv.items():
        assert rec.ranks[n] == (4 if v >= hi else 0 if v < lo else 2)
        assert logs[f"rank/{n}"] == rec.ranks[n]
    out = rec.training_step(tiny_batch, ctx)
    assert out.logs["awp_layers"] == sum(r > 0 for r in rec.ranks.values())
    assert out.logs["awp_norm"] > 0
    # radius: relative mode keeps every ||Δ_W||_F <= rho ||W||_F (checked inside the step via the log bound)
    assert all(not m.awp_enabled for m in rec.layers.values())


@pytest.mark.parametrize("attack", ["default", "eps0"])
@pytest.mark.parametrize("name", list_recipes())
def test_declared_forward_passes(name, attack, tiny_classifier, tiny_batch, tiny_clip_dir, tiny_world):
    """A recipe's step runs exactly the tower forwards its ``pass_counts`` declares (bench/step_cost.py's floor):
    counted by a global forward hook on every ViT tower, in units of one batch; also with the attack off (eps 0)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = _recipe_cfg(name)
    if attack == "eps0":
        if not hasattr(cfg, "pgd_eps"):
            pytest.skip(f"{name} has no training attack")
        cfg.pgd_eps = 0.0
    rec = create_recipe(name, tiny_classifier, cfg, text=_text_side(tiny_clip_dir, tiny_world))
    passes = rec.pass_counts()
    if passes is None:
        pytest.skip(f"{name} declares no pass counts")
    if hasattr(rec, "measure_curvature"):  # GRACE: activate the LAR-AWP branch (ranks from a curvature update)
        cfg_step = StepContext(device=torch.device("cpu"), step=0)
        rec.after_step(tiny_batch, cfg_step)
        assert any(r > 0 for r in rec.ranks.values())
    rows = []

    def hook(module, args, output):
        if isinstance(module, VisionTransformer):
            rows.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        rec.training_step(tiny_batch, StepContext(device=torch.device("cpu"), step=1, total_steps=100))
    finally:
        handle.remove()
    assert sum(rows) / tiny_batch["image"].shape[0] == passes["forward"], rows

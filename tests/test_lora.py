import pytest
import torch
from torch import nn

from grace_plugin.models.lora import LoRALinear, inject_lora, lora_parameters, merge_lora


@pytest.mark.parametrize("splits", [1, 3])
def test_merged_equals_unmerged(splits):
    torch.manual_seed(0)
    base = nn.Linear(12, 18)
    m = LoRALinear(base, rank=4, alpha=8.0, splits=splits)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(5, 7, 12)
    y = m(x)
    merged = m.merged_linear()
    assert torch.allclose(merged(x), y, atol=1e-5)
    # independent computation of the split update: q/k/v slices each get their own B_i A_i
    A = m.lora_A.view(splits, 4, 12)
    delta = torch.cat([m.lora_B[i] @ A[i] for i in range(splits)], 0) * m.scaling
    assert torch.allclose(base(x) + x @ delta.t(), y, atol=1e-5)


def test_zero_init_is_identity_and_only_adapters_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    ref = model(x)
    names = inject_lora(model, ["0", "2"], rank=2, alpha=2.0)
    assert names == ["0", "2"]
    assert torch.equal(model(x), ref)  # B = 0 at init
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    y = model(x)
    merge_lora(model)
    assert all(type(mod) is nn.Linear for mod in (model[0], model[2]))
    assert torch.allclose(model(x), y, atol=1e-5)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_lora(nn.Sequential(nn.Linear(2, 2)), ["blocks.*.qkv"], 2, 2.0)


def test_modules_to_save_train_in_full_beside_the_adapters(tiny_classifier):
    """recipe.lora_modules_to_save (PEFT's modules_to_save): the matched tower parameters train, the other frozen
    weights stay frozen; a glob that matches nothing is a one-line ConfigError."""
    import copy

    from grace_plugin.config import ConfigError
    from grace_plugin.recipes import create_recipe, get_recipe_class

    cfg = get_recipe_class("ft").Config(lora=True, lora_rank=2, lora_alpha=4.0,
                                        lora_modules_to_save=["patch_embed.*"])
    model = copy.deepcopy(tiny_classifier)
    rec = create_recipe("ft", model, cfg)
    names = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert {n for n in names if not ("lora_A" in n or "lora_B" in n)} == {
        n for n, _ in model.visual.named_parameters() if n.startswith("patch_embed.")}
    assert len(rec.trainable_parameters()) == len(names) + int(model.head.weight.requires_grad)  # ft trains its head
    cfg.lora_modules_to_save = ["no_such_module.*"]
    with pytest.raises(ConfigError, match="lora_modules_to_save"):
        create_recipe("ft", copy.deepcopy(tiny_classifier), cfg)

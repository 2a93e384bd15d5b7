"""Registry-driven: every registered recipe gets these tests without editing this file; then GRACE's options."""
import copy

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
    constraint = fields["pgd_steps"].metadata.get("constraint") if "pgd_steps" in fields else None
    if "pgd_steps" in fields and (constraint is None or constraint.error(2) is None):
        overrides["pgd_steps"] = 2  # a short multi-step attack, where the recipe allows one (grace_lite: 1 step)
    return build_config(name, overrides={"recipe": overrides}).recipe


@pytest.mark.parametrize("name", list_recipes())
def test_one_step(name, tiny_classifier, tiny_batch, tiny_text):
    torch.manual_seed(0)
    rec = create_recipe(name, tiny_classifier, _recipe_cfg(name), text=tiny_text)
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
    assert set(rec.awp.ranks.values()) == {0}  # Alg. 1 l.2
    logs = rec.after_step(tiny_batch, ctx)
    curv = rec.awp.curvature
    lo, hi = np.percentile(list(curv.values()), 20), np.percentile(list(curv.values()), 80)
    for n, v in curv.items():
        assert rec.awp.ranks[n] == (4 if v >= hi else 0 if v < lo else 2)
        assert logs[f"rank/{n}"] == rec.awp.ranks[n]
    out = rec.training_step(tiny_batch, ctx)
    assert out.logs["awp_layers"] == sum(r > 0 for r in rec.awp.ranks.values())
    assert out.logs["awp_norm"] > 0
    assert all(not m.awp_enabled for m in rec.awp.layers.values())


# ------------------------------------------------------------------------------------------- GRACE options
CPU = StepContext(device=torch.device("cpu"), step=1, total_steps=100)


def _grace(model, batch, **over):
    """A GRACE recipe whose AWP ranks come from one curvature measurement (so the LAR-AWP branch is active)."""
    cfg = _recipe_cfg("grace")
    cfg.curvature_interval = 1
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    rec = create_recipe("grace", model, cfg)
    rec.after_step(batch, StepContext(device=torch.device("cpu"), step=0))
    assert any(r > 0 for r in rec.awp.ranks.values())
    return rec


def _record_ascent(rec):
    """After every AWP ascent step (either ascent): each active layer's ||Δ_W||_F and its factors (A, B, mask)."""
    owner = getattr(rec, "awp", rec)  # GRACE keeps LAR-AWP in its component (recipes/lar_awp.py)
    calls = []

    def recording(orig):
        def wrapped(active, *args, **kwargs):
            orig(active, *args, **kwargs)
            calls.append({n: (float(m.awp_delta().detach().float().norm()), m.awp_A.detach().clone(),
                              m.awp_B.detach().clone(), m.awp_mask.clone()) for n, m in active.items()})
        return wrapped

    for name in ("_ascend_factors", "_ascend_svd"):
        setattr(owner, name, recording(getattr(owner, name)))
    return calls


def _weight_norm(m) -> float:
    with torch.no_grad():
        return float((m.base.weight + m.lora_delta()).float().norm())


@pytest.mark.parametrize("ascent", ["factor", "svd"])
@pytest.mark.parametrize("awp_lr", [0.5, 3.0])
@pytest.mark.parametrize("rho_mode", ["relative", "absolute"])
def test_grace_awp_radius(rho_mode, awp_lr, ascent, tiny_classifier, tiny_batch):
    """One ascent step from B = 0, the radius being ρ ||W||_F (relative) or ρ. Factor ascent: along the normalised
    gradient, A with orthonormal rows, so ||Δ_W||_F is exactly min(awp_lr, 1) times the radius (awp_lr > 1 hits the
    projection). SVD ascent: the first-order worst case, on the bound whatever awp_lr, of rank <= the layer's."""
    rho = 0.01
    rec = _grace(tiny_classifier, tiny_batch, rho=rho, rho_mode=rho_mode, awp_lr=awp_lr, awp_ascent=ascent)
    calls = _record_ascent(rec)
    out = rec.training_step(tiny_batch, CPU)
    assert len(calls) == 1
    for n, (norm, *_) in calls[0].items():
        m = rec.awp.layers[n]
        radius = rho * _weight_norm(m) if rho_mode == "relative" else rho
        assert norm == pytest.approx((min(awp_lr, 1.0) if ascent == "factor" else 1.0) * radius, rel=1e-4), n
        assert torch.linalg.matrix_rank(calls[0][n][2] * calls[0][n][3]) <= rec.awp.ranks[n]
        if rho_mode == "relative":
            assert out.logs[f"awp_rel/{n}"] == pytest.approx(norm / _weight_norm(m), rel=1e-4)
    assert out.logs["delta_l"] == pytest.approx(out.logs["l_lar"] - out.logs["l_adv"], abs=1e-6)


@pytest.mark.parametrize("ascent", ["factor", "svd"])
def test_grace_awp_steps_stay_in_the_ball_and_count_passes(ascent, tiny_classifier, tiny_batch, tower_rows):
    """awp_steps=3: three ascent steps (the later ones also move A), each projected onto ||Δ_W||_F <= ρ||W||_F;
    the step runs the tower forwards ``pass_counts`` declares."""
    rec = _grace(tiny_classifier, tiny_batch, awp_steps=3, awp_lr=2.0, awp_ascent=ascent)
    calls = _record_ascent(rec)
    _, rows = tower_rows(lambda: rec.training_step(tiny_batch, CPU))
    assert len(calls) == 3
    for call in calls:
        for n, (norm, *_) in call.items():
            assert norm <= rec.cfg.rho * _weight_norm(rec.awp.layers[n]) * (1 + 1e-4), n
    n0 = next(iter(calls[0]))
    assert torch.equal(calls[0][n0][1], calls[1][n0][1]) is False  # A moves after the first step
    assert sum(rows) / tiny_batch["image"].shape[0] == rec.pass_counts()["forward"] == 2 + 2 + 1 + 2


@pytest.mark.parametrize("awp_input", ["adv", "clean"])
def test_grace_awp_input(awp_input, tiny_classifier, tiny_batch):
    """L_LAR is the CE of the model under the final Δ* on x_adv (default) or on the clean x (awp_input=clean):
    recomputed here from the recorded Δ* on the clean batch, it matches only for ``clean``."""
    import torch.nn.functional as F

    from grace_plugin.perturbation import awp_branch

    rec = _grace(tiny_classifier, tiny_batch, awp_input=awp_input)
    calls = _record_ascent(rec)
    out = rec.training_step(tiny_batch, CPU)
    x, y = tiny_batch["image"], tiny_batch["label"]
    final = calls[-1]
    with torch.no_grad(), awp_branch(rec.awp.layers[n] for n in final):
        for n, (_, a, b, mask) in final.items():
            m = rec.awp.layers[n]
            m.awp_A, m.awp_B, m.awp_mask = a, b, mask
        clean_lar = float(F.cross_entropy(tiny_classifier(x), y))
    if awp_input == "clean":
        assert out.logs["l_lar"] == pytest.approx(clean_lar, rel=1e-4)
    else:
        assert out.logs["l_lar"] > clean_lar * (1 + 1e-3)  # on x_adv the loss is higher than on x


@pytest.mark.parametrize("gv_grad", ["all", "adv_awp"])
def test_grace_gv_grad(gv_grad, tiny_classifier, tiny_batch, monkeypatch):
    """gv_grad=adv_awp stops L_GV's gradient through f_ID only: the Gram volume gets a detached f_ID, the loss value
    is unchanged and the LoRA gradients differ from gv_grad=all by exactly L_GV's f_ID path."""
    import sys

    import grace_plugin.losses as losses

    seen = []
    orig = losses.gram_volume

    def spy(f_id, *rest, **kw):
        seen.append([f_id.requires_grad] + [t.requires_grad for t in rest if isinstance(t, torch.Tensor)])
        return orig(f_id, *rest, **kw)

    for mod in [m for name, m in sys.modules.items() if name.startswith("grace_plugin.recipes")]:
        if getattr(mod, "gram_volume", None) is orig:
            monkeypatch.setattr(mod, "gram_volume", spy)

    def grads(mode):
        rec = _grace(copy.deepcopy(tiny_classifier), tiny_batch, gv_grad=mode, pgd_random_start=False)
        torch.manual_seed(1)
        out = rec.training_step(tiny_batch, CPU)
        return float(out.loss), torch.autograd.grad(out.loss, rec.trainable_parameters())

    loss, g = grads(gv_grad)
    assert seen[-1] == [gv_grad == "all", True, True]
    other_loss, other_g = grads("adv_awp" if gv_grad == "all" else "all")
    assert loss == pytest.approx(other_loss, rel=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(g, other_g))


@pytest.mark.parametrize("labels", ["true", "sampled"])
def test_grace_curvature_labels(labels, tiny_classifier, tiny_batch):
    """Eq. 28 recomputed here: n * mean(g ⊙ g) of each adapted weight's gradient of the CE on the true labels, or on
    labels drawn from the model's own predictive distribution (curvature_labels=sampled, same RNG state)."""
    import torch.nn.functional as F

    rec = _grace(tiny_classifier, tiny_batch, curvature_labels=labels)
    x, y = tiny_batch["image"], tiny_batch["label"]
    torch.manual_seed(5)
    got = rec.awp.measure_curvature(x, y, StepContext(device=torch.device("cpu")))
    weights = [m.base.weight for m in rec.awp.layers.values()]
    for w in weights:
        w.requires_grad_(True)
    torch.manual_seed(5)
    logits = tiny_classifier(x)
    if labels == "true":
        target = y
    else:  # one draw from each sample's predictive distribution by inverse-CDF sampling of a uniform
        u = torch.empty(x.shape[0], 1).uniform_(0, 1)
        cdf = torch.softmax(logits.detach().float(), -1).cumsum(-1)
        target = torch.searchsorted(cdf, u).clamp(max=logits.shape[1] - 1).squeeze(1)
    gs = torch.autograd.grad(F.cross_entropy(logits, target), weights)
    for w in weights:
        w.requires_grad_(False)
    for n, g in zip(rec.awp.layers, gs):
        assert got[n] == pytest.approx(float(x.shape[0] * (g * g).mean()), rel=1e-4), n
    if labels == "sampled":
        assert not torch.equal(target, y)  # the sampled labels are not the true ones (the test can tell them apart)


@pytest.mark.parametrize("attack", ["default", "eps0"])
@pytest.mark.parametrize("name", list_recipes())
def test_declared_forward_passes(name, attack, tiny_classifier, tiny_batch, tiny_text, tower_rows):
    """A recipe's step runs exactly the tower forwards its ``pass_counts`` declares (bench/step_cost.py's floor):
    counted by a global forward hook on every ViT tower, in units of one batch; also with the attack off (eps 0)."""
    torch.manual_seed(0)
    cfg = _recipe_cfg(name)
    if attack == "eps0":
        if not hasattr(cfg, "pgd_eps"):
            pytest.skip(f"{name} has no training attack")
        cfg.pgd_eps = 0.0
    rec = create_recipe(name, tiny_classifier, cfg, text=tiny_text)
    passes = rec.pass_counts()
    if passes is None:
        pytest.skip(f"{name} declares no pass counts")
    if hasattr(rec, "awp"):  # GRACE: activate the LAR-AWP branch (ranks from a curvature update)
        cfg_step = StepContext(device=torch.device("cpu"), step=0)
        rec.after_step(tiny_batch, cfg_step)
        assert any(r > 0 for r in rec.awp.ranks.values())
    _, rows = tower_rows(
        lambda: rec.training_step(tiny_batch, StepContext(device=torch.device("cpu"), step=1, total_steps=100)))
    assert sum(rows) / tiny_batch["image"].shape[0] == passes["forward"], rows


# ------------------------------------------------------------------------------------------------ grace_lite
def _spy_objective(rec) -> dict:
    """Wrap grace_lite's ``objective``: the returned dict receives the x_adv, first ascent gradients and clean
    feature that the attack handed on, at each step."""
    seen = {}
    orig = rec.objective

    def spy(x_, x_adv, y_, ctx_, f_id=None, first_grads=None):
        seen.update(x_adv=x_adv, first_grads=first_grads, f_id=f_id)
        return orig(x_, x_adv, y_, ctx_, f_id=f_id, first_grads=first_grads)

    rec.objective = spy
    return seen


@pytest.mark.parametrize("attack_grad", ["noisy", "clean"])
def test_grace_lite_attack_and_shared_ascent(attack_grad, tiny_classifier, tiny_batch):
    """grace_lite's x_adv is N-FGSM's (arXiv 2206.03098 Alg. 1: x + η + α sign(∇), η ~ U[-2ε, 2ε], no projection),
    the gradient taken at x + η (noisy) or at x (clean), and the first AWP ascent gradient it hands on is the CE
    gradient w.r.t. B_awp at that same point: both recomputed here independently, with the same per-sample noise."""
    import torch.nn.functional as F

    from grace_plugin.rng import per_sample_uniform

    cfg = _recipe_cfg("grace_lite")
    cfg.curvature_interval, cfg.attack_grad, cfg.pgd_steps = 1, attack_grad, 1
    torch.manual_seed(0)
    rec = create_recipe("grace_lite", tiny_classifier, cfg)
    rec.after_step(tiny_batch, StepContext(device=torch.device("cpu"), step=0))
    assert any(r > 0 for r in rec.awp.ranks.values())
    x, y = tiny_batch["image"], tiny_batch["label"]
    ctx = StepContext(device=torch.device("cpu"), step=3, total_steps=100, seed=7,
                      sample_index=torch.arange(x.shape[0]))
    seen = _spy_objective(rec)
    rec.training_step(tiny_batch, ctx)
    eps = cfg.pgd_eps
    noise = per_sample_uniform(x, -2 * eps, 2 * eps, ctx, "attack_start")
    point = (x + noise).clamp(0, 1) if attack_grad == "noisy" else x.clone()
    point.requires_grad_(True)
    with rec.awp.branch(ctx):  # the same branch draw (from seed and step), at B_awp = 0
        with rec.awp.record():
            logits = tiny_classifier(point)
        params = rec.awp.ascent_parameters()  # the recorded layer outputs
        g_x, *g_b = torch.autograd.grad(F.cross_entropy(logits, y), [point, *params])
    start = point.detach() if attack_grad == "noisy" else x + noise
    expected = (start + cfg.pgd_alpha * g_x.sign()).clamp(0, 1)
    assert torch.allclose(seen["x_adv"], expected, atol=1e-6)
    assert (seen["x_adv"] - x).abs().max() > eps + 1e-4  # not projected onto the eps-ball (N-FGSM)
    assert len(seen["first_grads"]) == len(g_b) > 0
    for got, want in zip(seen["first_grads"], g_b):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert (seen["f_id"] is not None) == (attack_grad == "clean")  # the clean variant reuses its clean forward


def test_grace_lite_two_steps_share_the_last_backward(tiny_classifier, tiny_batch, tower_rows):
    """pgd_steps 2 (RS-FGSM-style start, projected): x_adv is two signed steps from the noisy start, projected after
    each, and the ascent gradient is the CE gradient w.r.t. B_awp at the second step's point: both recomputed here;
    passes: 2 attack forwards and input backwards, one backward fewer than without sharing."""
    import torch.nn.functional as F

    from grace_plugin.rng import per_sample_uniform

    cfg = _recipe_cfg("grace_lite")
    cfg.curvature_interval, cfg.pgd_steps, cfg.noise, cfg.project = 1, 2, 1.0, True
    cfg.pgd_alpha = 0.75 * cfg.pgd_eps
    rec = create_recipe("grace_lite", tiny_classifier, cfg)
    rec.after_step(tiny_batch, StepContext(device=torch.device("cpu"), step=0))
    x, y = tiny_batch["image"], tiny_batch["label"]
    ctx = StepContext(device=torch.device("cpu"), step=5, total_steps=100, seed=3,
                      sample_index=torch.arange(x.shape[0]))
    seen = _spy_objective(rec)
    rec.training_step(tiny_batch, ctx)
    eps, alpha = cfg.pgd_eps, cfg.pgd_alpha
    p0 = (x + per_sample_uniform(x, -eps, eps, ctx, "attack_start")).clamp(0, 1).requires_grad_(True)
    with rec.awp.branch(ctx):
        g0 = torch.autograd.grad(F.cross_entropy(tiny_classifier(p0), y), p0)[0]
        p1 = (x + (p0.detach() - x + alpha * g0.sign()).clamp(-eps, eps)).clamp(0, 1).requires_grad_(True)
        with rec.awp.record():
            logits = tiny_classifier(p1)
        params = rec.awp.ascent_parameters()  # the recorded layer outputs
        g1, *g_b = torch.autograd.grad(F.cross_entropy(logits, y), [p1, *params])
    expected = (x + (p1.detach() - x + alpha * g1.sign()).clamp(-eps, eps)).clamp(0, 1)
    assert torch.allclose(seen["x_adv"], expected, atol=1e-6)
    assert (seen["x_adv"] - x).abs().max() <= eps + 1e-6
    for got, want in zip(seen["first_grads"], g_b, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    out, rows = tower_rows(lambda: rec.training_step(tiny_batch, CPU))
    passes = rec.pass_counts()
    n = x.shape[0]
    assert sum(rows) / n == passes["forward"] == 4 + cfg.awp_fraction
    assert passes["input_backward"] == 2 and passes["backward"] == 2 + cfg.awp_fraction
    cfg.attack_grad = "clean"
    with pytest.raises(ValueError, match="attack_grad clean .* needs recipe.pgd_steps 1"):
        create_recipe("grace_lite", tiny_classifier, cfg)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("attack_grad", ["noisy", "clean"])
def test_grace_lite_declared_passes(attack_grad, fraction, tiny_classifier, tiny_batch, tower_rows):
    """Forwards counted by a hook on the tower; backwards from the step's structure: the attack's input backward
    also gives the ascent gradient, so one backward fewer than grace_fast (4 forwards, 1 input backward, 4); with
    awp_fraction 0.5 the AWP view runs on half the batch (half a forward and half a backward)."""
    cfg = _recipe_cfg("grace_lite")
    cfg.curvature_interval, cfg.attack_grad, cfg.awp_fraction, cfg.pgd_steps = 1, attack_grad, fraction, 1
    rec = create_recipe("grace_lite", tiny_classifier, cfg)
    rec.after_step(tiny_batch, StepContext(device=torch.device("cpu"), step=0))
    out, rows = tower_rows(lambda: rec.training_step(tiny_batch, CPU))
    passes = rec.pass_counts()
    n = tiny_batch["image"].shape[0]
    assert sum(rows) / n == passes["forward"] == (3 if attack_grad == "noisy" else 2) + fraction
    assert rows[-1] == n * fraction  # the last forward is the AWP view
    assert passes["input_backward"] == 1 and passes["backward"] == 2 + fraction
    assert torch.isfinite(out.loss)


def test_awp_fraction_is_the_loss_on_its_rows(tiny_classifier, tiny_batch):
    """awp_fraction 0.5: the AWP view holds the samples awp_rows picks (odd global indices), and L_LAR is the sum of
    their CE over 0.5 * B (an unbiased estimate of the batch mean)."""
    import torch.nn.functional as F

    rec = _grace(tiny_classifier, tiny_batch, awp_fraction=0.5)
    seen = {}
    orig = rec.awp.perturbed_features

    def spy(x_awp, y, f_first, ctx, first_grads=None, loss_norm=None):
        f, logs = orig(x_awp, y, f_first, ctx, first_grads=first_grads, loss_norm=loss_norm)
        seen.update(n=x_awp.shape[0], f_awp=f.detach(), y=y, norm=loss_norm)
        return f, logs

    rec.awp.perturbed_features = spy
    out = rec.training_step(tiny_batch, CPU)
    n = tiny_batch["image"].shape[0]
    assert seen["n"] == n // 2 and torch.equal(seen["y"], tiny_batch["label"][1::2]) and seen["norm"] == n / 2
    ce_sum = float(F.cross_entropy(tiny_classifier.head(seen["f_awp"]), seen["y"], reduction="sum"))
    assert out.logs["l_lar"] == pytest.approx(ce_sum / (n / 2), rel=1e-5)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 1 / 3])
def test_awp_rows_are_the_same_samples_on_any_number_of_ranks(fraction):
    """The rows come from global indices: two ranks holding halves of a batch pick exactly the samples one process
    picks, about fraction * B of them, and the per-rank normalisers average to the one-process one."""
    from grace_plugin.recipes.grace import awp_rows

    b = 24
    one, norm = awp_rows(b, fraction)
    parts = [awp_rows(b // 2, fraction, torch.arange(r * b // 2, (r + 1) * b // 2)) for r in range(2)]
    union = torch.cat([idx + r * b // 2 for r, (idx, _) in enumerate(parts)])
    assert torch.equal(union, one)
    assert abs(len(one) - fraction * b) < 1 and norm == pytest.approx(fraction * b)
    assert sum(n for _, n in parts) == pytest.approx(norm)  # the ranks' sums over their norms average to one

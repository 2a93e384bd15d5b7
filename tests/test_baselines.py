"""Recipe-specific properties of the baselines, each against a closed form or an independent computation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.config import TrainConfig
from grace_plugin.optim import FTP, SPD, DiGraP, digrap_direction, ftp_project, ftp_row_norms
from grace_plugin.recipes import StepContext, create_recipe, get_recipe_class
from grace_plugin.weightspace import interpolate_state_dicts, pareto_frontier, wise_ft_sweep

CPU = StepContext(device=torch.device("cpu"))


def _cfg(name, **kw):
    cfg = get_recipe_class(name).Config()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _pgd(f_loss, x, eps, alpha, steps):
    """Independent l_inf PGD without random start: x <- Π(x + α sign ∇ loss)."""
    z = x.clone()
    for _ in range(steps):
        z.requires_grad_(True)
        g, = torch.autograd.grad(f_loss(z), z)
        z = torch.min(torch.max(z.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return z.detach()


# ------------------------------------------------------------------------------------------------- WiSE-FT
def test_interpolation_endpoints_and_linearity():
    torch.manual_seed(0)
    zs = {"a": torch.randn(4, 3), "b": torch.randn(5), "n": torch.tensor(3)}
    ft = {"a": torch.randn(4, 3), "b": torch.randn(5), "n": torch.tensor(7)}
    at0, at1, half = (interpolate_state_dicts(zs, ft, a) for a in (0.0, 1.0, 0.5))
    assert all(torch.equal(at0[k], zs[k]) for k in ("a", "b")) and all(torch.equal(at1[k], ft[k]) for k in ft)
    for k in ("a", "b"):
        assert torch.allclose(half[k], (zs[k] + ft[k]) / 2, atol=1e-7)
    assert int(half["n"]) == 7  # integer buffers are not interpolated
    with pytest.raises(ValueError, match="different keys"):
        interpolate_state_dicts(zs, {"a": ft["a"]}, 0.5)


def test_wise_ft_sweep_frontier():
    lin = torch.nn.Linear(2, 2)
    zs = {k: v.clone() for k, v in lin.state_dict().items()}
    out = wise_ft_sweep(zs, lin, [0.0, 0.2, 0.4, 0.6, 1.0], lambda m: {"id": 0.0, "ood": 0.0})
    assert [p["alpha"] for p in out["points"]] == [0.0, 0.2, 0.4, 0.6, 1.0]
    pts = [{"alpha": a, "id": a, "ood": 1 - (a - 0.4) ** 2} for a in (0.0, 0.2, 0.4, 0.6, 1.0)]
    assert [p["alpha"] for p in pareto_frontier(pts)] == [0.4, 0.6, 1.0]


@pytest.mark.parametrize("lora", [False, True])
def test_wise_ft_export_endpoints(tiny_classifier, lora):
    zs = {k: v.clone() for k, v in tiny_classifier.state_dict().items()}
    exported = {}
    for alpha in (0.0, 1.0):
        model = copy.deepcopy(tiny_classifier)
        rec = create_recipe("wise_ft", model, _cfg("wise_ft", alpha=alpha, lora=lora, lora_rank=2, lora_alpha=2.0))
        torch.manual_seed(1)
        with torch.no_grad():  # stand-in for training: move every trainable tensor
            for p in rec.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
        from grace_plugin.models.lora import merge_lora

        ft_ref = {k: v.clone() for k, v in merge_lora(copy.deepcopy(model).visual).state_dict().items()}
        exported[alpha] = rec.export_model().state_dict()
        if alpha == 1.0:
            assert all(torch.equal(exported[1.0][f"visual.{k}"], v) for k, v in ft_ref.items())
    assert all(torch.equal(exported[0.0][k], zs[k]) for k in zs)
    assert not torch.equal(exported[1.0]["head.weight"], zs["head.weight"])  # the head is interpolated too


# ------------------------------------------------------------------------------------------------- LP-FT
def test_lp_ft_stage1_changes_only_the_head(tiny_classifier, tiny_batch):
    rec = create_recipe("lp_ft", tiny_classifier, _cfg("lp_ft", lp_fraction=0.5))
    before = {n: p.detach().clone() for n, p in tiny_classifier.named_parameters()}
    opt = rec.create_optimizer(rec.trainable_parameters(), TrainConfig(lr=1e-2, weight_decay=0.1))
    ctx = StepContext(device=torch.device("cpu"), step=0, total_steps=10)
    assert rec.in_probe_stage(ctx)
    rec.training_step(tiny_batch, ctx).loss.backward()
    opt.step()
    for n, p in tiny_classifier.named_parameters():
        assert torch.equal(p, before[n]) != (n == "head.weight"), n
    opt.zero_grad(set_to_none=True)
    ctx2 = StepContext(device=torch.device("cpu"), step=5, total_steps=10)
    assert not rec.in_probe_stage(ctx2)
    rec.training_step(tiny_batch, ctx2).loss.backward()
    assert all(p.grad is not None for p in rec.trainable_parameters())


# -------------------------------------------------------------------------------------------------- SAM
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_restores_weights_and_gradient_is_at_perturbed_point(tiny_classifier, tiny_batch, adaptive):
    rho, eta = 0.05, 0.01
    ref = copy.deepcopy(tiny_classifier)
    rec = create_recipe("sam", tiny_classifier, _cfg("sam", rho=rho, adaptive=adaptive, asam_eta=eta))
    params = rec.trainable_parameters()
    before = [p.detach().clone() for p in params]
    out = rec.training_step(tiny_batch, CPU)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored bit for bit
    out.loss.backward()
    # independent: grad at w, ε = ρ T²g/||Tg|| (T = 1 for SAM, |w| + η for ASAM), grad at w + ε
    x, y = tiny_batch["image"], tiny_batch["label"]
    ref_params = [dict(ref.named_parameters())[n] for n, p in tiny_classifier.named_parameters() if p.requires_grad]
    for p in ref_params:
        p.requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), ref_params)
    t = [(p.detach().abs() + eta) if adaptive else torch.ones_like(p) for p in ref_params]
    norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    with torch.no_grad():
        for p, ti, gi in zip(ref_params, t, g):
            p.add_(rho * ti * ti * gi / norm)
    g_pert = torch.autograd.grad(F.cross_entropy(ref(x), y), ref_params)
    for p, gp in zip(params, g_pert):
        assert torch.allclose(p.grad, gp, rtol=1e-4, atol=1e-6)
    assert out.logs["eps_norm"] == pytest.approx(float(torch.sqrt(sum(((ti * ti * gi / norm * rho) ** 2).sum()
                                                                      for ti, gi in zip(t, g)))), rel=1e-4)


# ------------------------------------------------------------------------------------ FTP / SPD / DiGraP
def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]


def _grads(t, params):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_digrap_with_zero_strength_is_adam():
    for kw in ({"trainable": False, "strength": 0.0}, {"trainable": True, "mu": 0.0}):
        a, b = _params(), _params()
        opt_a = DiGraP(a, lr=1e-2, **kw)
        opt_b = torch.optim.Adam(b, lr=1e-2)
        for t in range(6):
            for p, q, g in zip(a, b, _grads(t, a)):
                p.grad, q.grad = g.clone(), g.clone()
            opt_a.step()
            opt_b.step()
            assert all(torch.allclose(p, q, atol=1e-7, rtol=0) for p, q in zip(a, b)), (kw, t)


def test_digrap_direction_closed_form_and_strength_learns():
    g1, g2 = torch.tensor([1.0, 2.0, 0.0]), torch.tensor([-1.0, 0.0, 1.0])
    g, proj = digrap_direction(g1, g2, 1.0)  # conflict: g1·g2 = -1
    assert torch.allclose(proj, torch.tensor([0.5, 0.0, -0.5])) and abs(float((g * g2).sum())) < 1e-7
    g, proj = digrap_direction(g1, -g2, 1.0)  # no conflict: untouched
    assert torch.equal(g, g1) and not proj.any()
    params = _params()
    opt = DiGraP(params, lr=1e-2, mu=0.1)
    for _ in range(8):
        for p in params:  # gradients pulling away from the anchor: always conflicting after the first step
            p.grad = -(p.detach() - opt.state[p]["anchor"]) - 0.01
        opt.step()
    assert 0.0 <= opt.stats()["digrap_omega_mean"] <= 1.0


def _step_both(opt, ref, params, shadow, t):
    """Move the reference optimizer's shadow weights to ``params``, give both the same gradients, step both."""
    with torch.no_grad():
        for s, p in zip(shadow, params):
            s.copy_(p)
    gs = _grads(t, params)
    for p, s, g in zip(params, shadow, gs):
        p.grad, s.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    return gs


def test_ftp_rows_stay_in_the_learned_l1_ball():
    params = _params()
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    anchors = [p.detach().clone() for p in params]
    opt = FTP(params, lr=5e-2, weight_decay=0.01, k=0.5, mu=1e-2)
    ref = torch.optim.AdamW(shadow, lr=5e-2, weight_decay=0.01)
    for t in range(8):
        _step_both(opt, ref, params, shadow, t)  # ref: the unprojected AdamW proposal from the same point and moments
        for p, s, a in zip(params, shadow, anchors):
            gamma = opt.state[p]["gamma"]
            assert torch.allclose(p, ftp_project(a, s.detach(), gamma), atol=1e-6)
            assert (ftp_row_norms(p.detach() - a) <= gamma + 1e-5).all()
    assert any(float(opt.state[p]["gamma"]) > 1e-8 for p in params)  # γ was learned


def test_spd_selective_decay_closed_form():
    params = _params()
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    anchors = [p.detach().clone() for p in params]
    opt = SPD(params, lr=5e-2, lam=1.0)
    ref = torch.optim.Adam(shadow, lr=5e-2)
    n_selected = 0
    for t in range(8):
        prev = [p.detach().clone() for p in params]
        gs = _step_both(opt, ref, params, shadow, t)
        for p, s, a, q, g in zip(params, shadow, anchors, prev, gs):
            prop = s.detach()
            if float((g * (a - q)).sum()) < 0:
                n_selected += 1
                d = prop - a
                r = torch.clamp((d.norm() - (q - a).norm()) / d.norm(), 0, 1)
                assert torch.allclose(p, prop - r * d, atol=1e-6)
                assert (p - a).norm() <= (q - a).norm() + 1e-5  # λ = 1: no further drift on selected tensors
            else:
                assert torch.allclose(p, prop, atol=1e-6)
    assert n_selected > 0


# -------------------------------------------------------------------------------- adversarial losses
def test_tecoa_loss_matches_independent_pgd(tiny_classifier, tiny_batch):
    eps, alpha, steps = 4 / 255, 1 / 255, 3
    ref = copy.deepcopy(tiny_classifier).eval()
    rec = create_recipe("tecoa", tiny_classifier, _cfg("tecoa", pgd_steps=steps, pgd_random_start=False))
    out = rec.training_step(tiny_batch, CPU)
    x, y = tiny_batch["image"], tiny_batch["label"]
    x_adv = _pgd(lambda z: F.cross_entropy(ref(z), y), x, eps, alpha, steps)
    expected = F.cross_entropy(ref(x_adv), y)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert float(out.loss.detach()) > float(F.cross_entropy(ref(x), y))


@pytest.mark.parametrize("ori_input", ["adv", "clean"])
def test_pmg_aft_loss_matches_independent_computation(tiny_classifier, tiny_batch, ori_input):
    eps, alpha, steps = 4 / 255, 1 / 255, 2
    ref = copy.deepcopy(tiny_classifier).eval()
    rec = create_recipe("pmg_aft", tiny_classifier, _cfg("pmg_aft", pgd_steps=steps, pgd_random_start=False,
                                                         ori_input=ori_input))
    with torch.no_grad():  # move the model away from the frozen original so both KL terms are non-zero
        for p in rec.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    moved = copy.deepcopy(tiny_classifier).eval()
    out = rec.training_step(tiny_batch, CPU)
    x, y = tiny_batch["image"], tiny_batch["label"]
    x_adv = _pgd(lambda z: F.cross_entropy(moved(z), y), x, eps, alpha, steps)

    def kl(p, q):  # KL(p || q), batch mean, from the definition
        return (p * (p.log() - q.log())).sum(1).mean()

    x_ori = x_adv if ori_input == "adv" else x  # what the frozen original p_0 sees
    p_adv, p_nat, p_ori = (F.softmax(m(z), 1) for m, z in ((moved, x_adv), (moved, x), (ref, x_ori)))
    expected = F.cross_entropy(moved(x_adv), y) + kl(p_ori, p_adv) + kl(p_nat, p_adv)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-4)
    assert out.logs["kl_ori"] == pytest.approx(float(kl(p_ori, p_adv)), rel=1e-4)
    other = F.softmax(ref(x if ori_input == "adv" else x_adv), 1)  # the other input gives another KL
    assert abs(out.logs["kl_ori"] - float(kl(other, p_adv))) > 1e-3 * out.logs["kl_ori"]
    assert out.logs["kl_ori"] > 0 and out.logs["kl_nat"] > 0


@pytest.mark.parametrize("clean_weight", [0.0, 0.3])
def test_fare_loss_matches_independent_computation(tiny_classifier, tiny_batch, clean_weight):
    eps, alpha, steps = 4 / 255, 1 / 255, 2
    orig = copy.deepcopy(tiny_classifier).eval()
    rec = create_recipe("fare", tiny_classifier, _cfg("fare", pgd_steps=steps, pgd_random_start=False,
                                                      clean_weight=clean_weight))
    with torch.no_grad():
        for p in rec.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    moved = copy.deepcopy(tiny_classifier).eval()
    out = rec.training_step(tiny_batch, CPU)
    x = tiny_batch["image"]
    phi = lambda m, z: m.visual(m.normalize(z))  # noqa: E731  (un-normalised CLIP embedding)
    with torch.no_grad():
        target = phi(orig, x)
    l2 = lambda z: ((phi(moved, z) - target) ** 2).sum(1).mean()  # noqa: E731
    z = _pgd(l2, x, eps, alpha, steps)
    # FARE's --clean_weight w: (1 - w) ||φ(z) - φ_orig(x)||² + w ||φ(x) - φ_orig(x)||²
    expected = (1 - clean_weight) * l2(z) + clean_weight * l2(x)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(l2(z)) > float(l2(x))  # the attack increased the embedding distance
    assert ("l2_clean" in out.logs) == bool(clean_weight)
    # an unmoved model at its origin has zero clean loss (the frozen copy is the original)
    fresh = create_recipe("fare", copy.deepcopy(orig), _cfg("fare", pgd_steps=0))
    assert float(fresh.training_step(tiny_batch, CPU).loss) == pytest.approx(0.0, abs=1e-8)


def test_flyp_loss_is_symmetric_infonce_on_class_prompts(tiny_classifier, tiny_batch, tiny_text):
    from grace_plugin.models.clip import zero_shot_weights

    text, bundle = tiny_text, tiny_text.bundle
    rec = create_recipe("flyp", tiny_classifier, _cfg("flyp"), text=text)
    torch.manual_seed(3)
    out = rec.training_step(tiny_batch, CPU)
    x, y = tiny_batch["image"], tiny_batch["label"]
    torch.manual_seed(3)
    t_idx = torch.randint(rec.tokens.shape[1], (y.shape[0],))
    img = F.normalize(tiny_classifier.visual(tiny_classifier.normalize(x)), dim=-1)
    txt = F.normalize(bundle.clip.encode_text(rec.tokens[y, t_idx]), dim=-1)
    logits = bundle.clip.logit_scale.exp() * img @ txt.t()
    labels = torch.arange(len(y))
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    # export: the head comes from the (changed) text tower
    out.loss.backward()
    opt = torch.optim.SGD(rec.text_parameters(), lr=1.0)
    opt.step()
    model = rec.export_model()
    expected_w = zero_shot_weights(bundle, text.classnames, text.templates)
    assert torch.allclose(model.head.weight, expected_w, atol=1e-6)
    assert float(model.head.logit_scale) == pytest.approx(float(bundle.clip.logit_scale.exp()), rel=1e-6)


@pytest.mark.parametrize("cls", [FTP, SPD, DiGraP])
def test_proximal_optimizer_state_round_trip_resumes_identically(cls):
    """Anchors and hyper-state live in the optimizer state: save/load mid-run continues to identical weights."""
    kw = {"mu": 0.1} if cls is DiGraP else {}
    a = _params()
    opt_a = cls(a, lr=5e-2, **kw)
    b = _params()
    for t in range(6):
        if t == 3:  # "kill": a new optimizer built on the current weights, state loaded
            with torch.no_grad():
                for p, q in zip(b, a):
                    p.copy_(q)
            opt_b = cls(b, lr=5e-2, **kw)
            opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
        for p, g in zip(a, _grads(t, a)):
            p.grad = g
        opt_a.step()
        if t >= 3:
            for p, g in zip(b, _grads(t, b)):
                p.grad = g
            opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_wise_ft_sweep_cli_rejects_bad_alphas(tmp_path, capsys):
    from grace_app.cli import main

    rc = main(["wise-ft-sweep", "--zero-shot", str(tmp_path), "--finetuned", str(tmp_path), "--data", str(tmp_path),
               "--alphas", "0,1.5", "--out", str(tmp_path / "o")])
    assert rc == 2 and "every alpha must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("name", __import__("grace_plugin.recipes", fromlist=["list_recipes"]).list_recipes())
def test_every_recipe_runs_on_lora(name, tiny_classifier, tiny_batch, tiny_text):
    """recipe.lora=true (LoRA-FT, LoRA-TeCoA, ... rows of Table 7): only adapters (and the head where the recipe
    trains it) receive gradients; the tower's own weights are frozen."""
    fields = get_recipe_class(name).Config.__dataclass_fields__
    kw = {"lora": True, "lora_rank": 2, "lora_alpha": 4.0, **({"pgd_steps": 1} if "pgd_steps" in fields else {})}
    rec = create_recipe(name, tiny_classifier, _cfg(name, **kw), text=tiny_text)
    rec.training_step(tiny_batch, CPU).loss.backward()
    for n, p in tiny_classifier.named_parameters():
        if "lora_" in n:
            assert p.grad is not None, n
        elif n != "head.weight":
            assert p.grad is None and not p.requires_grad, n
    assert (tiny_classifier.head.weight.grad is not None) == bool(rec.cfg.train_head)

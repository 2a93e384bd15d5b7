"""GRACE's components switched by config (Table 8 rows), the run-length curriculum and its counters, the GV share,
and the held-out validation split."""
import copy

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.finetune import build_config
from grace_plugin.losses import gram_volume
from grace_plugin.recipes import StepContext, create_recipe
from grace_plugin.recipes.lar_awp import curriculum_schedule

CPU = StepContext(device=torch.device("cpu"), step=1, total_steps=100)


def _grace(model, **kw):
    cfg = build_config("grace", overrides={"recipe": {"lora_rank": 4, "lora_alpha": 8.0, "pgd_steps": 2,
                                                      "pgd_random_start": False, **kw}}).recipe
    torch.manual_seed(0)
    return create_recipe("grace", model, cfg)


def test_two_view_gram_volume_closed_form():
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[0.6, 0.8, 0.0]])  # cos 0.6 -> area sin = 0.8
    assert gram_volume(a, b, eps=0.0).item() == pytest.approx(0.8, abs=1e-6)
    assert gram_volume(a, b, None, 1e-3).item() == pytest.approx(((1 + 1e-3) ** 2 - 0.36) ** 0.5, abs=1e-6)


def test_lora_ft_row_is_plain_clean_ce_without_attack(tiny_classifier, tiny_batch):
    rec = _grace(tiny_classifier, awp="off", gram_volume=False)
    assert rec.pass_counts() == {"forward": 1, "input_backward": 0, "backward": 1}
    ref = copy.deepcopy(tiny_classifier).eval()
    out = rec.training_step(tiny_batch, CPU)
    expected = F.cross_entropy(ref(tiny_batch["image"]), tiny_batch["label"])
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)
    assert "l_gv" not in out.logs and "l_lar" not in out.logs


def test_gv_only_row_adds_the_two_view_volume(tiny_classifier, tiny_batch):
    from grace_plugin.recipes.adversarial import pgd_attack

    rec = _grace(tiny_classifier, awp="off", gram_volume=True, lambda_gv=3.0)
    ref = copy.deepcopy(tiny_classifier).eval()
    x, y = tiny_batch["image"], tiny_batch["label"]
    out = rec.training_step(tiny_batch, CPU)
    x_adv = pgd_attack(ref, x, y, 4 / 255, 1 / 255, 2, random_start=False)
    f_id, f_adv = ref.encode(x), ref.encode(x_adv)
    gv = gram_volume(f_id, f_adv, None, 1e-6).mean()
    expected = F.cross_entropy(ref.head(f_id), y) + 3.0 * gv
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-4)
    assert out.logs["gv_share"] == pytest.approx(float(3.0 * gv / expected), rel=1e-4)
    assert rec.summary()["gv_share_mean"] == pytest.approx(out.logs["gv_share"])


@pytest.mark.parametrize("awp,gv", [("off", False), ("off", True), ("zero", False), ("uniform", False),
                                    ("curriculum", False), ("uniform", True)])
def test_component_rows_run_their_declared_forwards(awp, gv, tiny_classifier, tiny_batch, tower_rows):
    rec = _grace(tiny_classifier, awp=awp, gram_volume=gv, curvature_interval=1)
    if awp == "uniform":
        assert set(rec.awp.ranks.values()) == {2}  # rank_levels[1] everywhere from step 0, no curvature needed
    else:
        rec.after_step(tiny_batch, StepContext(device=torch.device("cpu"), step=0, total_steps=100))
    out, rows = tower_rows(lambda: rec.training_step(tiny_batch, CPU))
    assert sum(rows) / tiny_batch["image"].shape[0] == rec.pass_counts()["forward"]
    assert ("l_lar" in out.logs) == (awp != "off") and ("l_gv" in out.logs) == gv
    out.loss.backward()
    assert all(p.grad is not None for p in rec.trainable_parameters())


def test_curriculum_schedule_scales_with_run_length():
    assert curriculum_schedule(300, 1000, 0.9) == (1000, 0.9)  # unscaled: the paper's K and beta
    k, beta = curriculum_schedule(300, 1000, 0.9, updates=30, memory=0.1)
    assert k == 10 and beta == pytest.approx(1 - 1 / 3)  # time constant 0.1 * 300 / 10 = 3 updates
    k, beta = curriculum_schedule(250_000, 1000, 0.9, updates=250, memory=0.04)
    assert k == 1000 and beta == pytest.approx(0.9)  # the paper's proportions
    assert curriculum_schedule(10, 1, 0.9, memory=0.05)[1] == 0.0  # under one update of memory: no smoothing


def test_rank_changes_are_counted_and_logged(tiny_classifier, tiny_batch):
    untouched = copy.deepcopy(tiny_classifier)
    rec = _grace(tiny_classifier, curvature_updates=50, curvature_memory=0.01)  # interval 2, beta 0 on 100 steps
    ctx = lambda s: StepContext(device=torch.device("cpu"), step=s, total_steps=100)  # noqa: E731
    assert rec.after_step(tiny_batch, ctx(1)) == {}  # not a curriculum step
    logs = rec.after_step(tiny_batch, ctx(0))
    assert logs["curriculum_interval"] == 2 and logs["curriculum_beta"] == 0.0
    first = dict(rec.awp.ranks)
    assert rec.awp.rank_updates == 1 and rec.awp.rank_changes == 0  # the first allocation is not a change
    # reverse the curvature order: the next allocation (beta 0: the fresh measurement alone) changes ranks
    names = list(first)
    fake = {n: -v for n, v in rec.awp.curvature.items()}
    rec.awp.measure_curvature = lambda x, y, c: fake
    rec.after_step(tiny_batch, ctx(2))
    changed = sum(rec.awp.ranks[n] != first[n] for n in names)
    assert changed > 0 and rec.awp.rank_updates == 2 and rec.awp.rank_changes == changed
    assert rec.awp.rank_change_events == 1
    out = rec.training_step(tiny_batch, ctx(3))
    assert out.logs["awp_rank_changes"] == changed and out.logs["awp_rank_updates"] == 2
    state = rec.state_dict()
    fresh = _grace(untouched)
    fresh.load_state_dict(state)
    assert fresh.awp.rank_changes == changed and fresh.awp.ranks == rec.awp.ranks


def test_holdout_split_is_disjoint_complete_and_seeded(tiny_world, tmp_path):
    import tarfile

    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.split import holdout_split, is_held_out

    def keys(urls):
        out = set()
        for u in urls:
            with tarfile.open(u) as tf:
                out |= {m.name.split(".", 1)[0] for m in tf}
        return out

    src = keys(open_shard_set(tiny_world / "id", split="train").urls)
    counts = holdout_split(tiny_world / "id", tmp_path / "v", 0.2, seed=1)
    train = keys(open_shard_set(tmp_path / "v", split="train").urls)
    val = keys(open_shard_set(tmp_path / "v").urls)  # the default split ("test") is the validation split
    assert train.isdisjoint(val) and train | val == src
    assert val == {k for k in src if is_held_out(k, 0.2, 1)}
    assert (len(train), len(val)) == (counts["train"], counts["val"])
    assert 0.1 < len(val) / len(src) < 0.3
    assert open_shard_set(tmp_path / "v").classnames == open_shard_set(tiny_world / "id").classnames


def test_lar_at_rho_zero_row_is_clean_plus_adversarial_ce(tiny_classifier, tiny_batch, tower_rows):
    """Table 8's "+ L_LAR at rho = 0": L = CE(clean) + lambda_LAR CE(adversarial), no weight perturbation, no pass
    beyond the attack and the two views; delta_l is 0 (f_AWP is f_Adv)."""
    from grace_plugin.recipes.adversarial import pgd_attack

    rec = _grace(tiny_classifier, awp="zero", gram_volume=False, lambda_lar=2.0)
    assert rec.awp_rank() == 0 and rec.pass_counts() == {"forward": 2 + 2, "input_backward": 2, "backward": 2}
    ref = copy.deepcopy(tiny_classifier).eval()
    x, y = tiny_batch["image"], tiny_batch["label"]
    out, rows = tower_rows(lambda: rec.training_step(tiny_batch, CPU))
    x_adv = pgd_attack(ref, x, y, 4 / 255, 1 / 255, 2, random_start=False)
    expected = F.cross_entropy(ref(x), y) + 2.0 * F.cross_entropy(ref(x_adv), y)
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-4)
    assert out.logs["delta_l"] == 0.0 and out.logs["l_lar"] == pytest.approx(out.logs["l_adv"])
    assert sum(rows) / x.shape[0] == rec.pass_counts()["forward"]


def test_gv_only_row_is_grace_volume_without_lar(tiny_classifier, tiny_batch):
    """Table 8's "+ GV only" on the testbed: GRACE's three-view volume under its own perturbation, lambda_LAR 0: the
    loss is CE(clean) + lambda_GV L_GV, with L_LAR computed (logged) but weighted 0."""
    rec = _grace(tiny_classifier, awp="uniform", gram_volume=True, lambda_lar=0.0, lambda_gv=3.0)
    out = rec.training_step(tiny_batch, CPU)
    assert out.logs["l_lar"] > 0 and out.logs["awp_rel"] > 0  # the AWP view exists: a three-view volume
    assert float(out.loss) == pytest.approx(out.logs["l_task"] + 3.0 * out.logs["l_gv"], rel=1e-5)


def test_an_ablation_keeps_what_it_changes_over_the_values_it_inherits(tmp_path, monkeypatch):
    """tuned_as: the ablation rows take GRACE's tuned values, except the fields their own `set` changes; a method's
    own tuned values win over its set defaults."""
    import shutil

    from grace_app.testbed.configs import TESTBED_DIR, method_config

    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    (d / "tuned.yaml").write_text("grace: {recipe.lambda_lar: 2.5, recipe.awp: uniform, train.lr: 0.002}\n"
                                  "lora-tecoa: {train.lr: 0.0005}\n")
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    gv = method_config("ablation-gv-only")
    assert gv.recipe.lambda_lar == 0.0 and gv.recipe.awp == "curriculum" and gv.train.lr == 0.002
    rho0 = method_config("ablation-lar-rho0")
    assert rho0.recipe.awp == "zero" and rho0.recipe.lambda_lar == 2.5
    assert method_config("lora-tecoa").train.lr == 0.0005  # its own tuning wins over its set default 3e-3


def test_gradient_shares_closed_forms():
    from grace_plugin.losses import gradient_shares

    g1 = [torch.tensor([3.0, 0.0]), torch.tensor([0.0])]
    g2 = [torch.tensor([0.0, 4.0]), None]  # orthogonal, and absent from the second parameter
    out = gradient_shares({"a": g1, "b": g2})
    assert out["gnorm_a"] == pytest.approx(3.0) and out["gnorm_b"] == pytest.approx(4.0)
    assert out["gnorm_total"] == pytest.approx(5.0)
    assert out["gshare_a"] == pytest.approx(9 / 25) and out["gshare_b"] == pytest.approx(16 / 25)
    # opposed terms: g = g1 / 2, so a carries 2 and b pulls back -1 (the shares still sum to 1)
    out = gradient_shares({"a": [torch.tensor([2.0, 2.0])], "b": [torch.tensor([-1.0, -1.0])]})
    assert (out["gshare_a"], out["gshare_b"]) == (pytest.approx(2.0), pytest.approx(-1.0))


def test_grace_logs_each_terms_gradient_share(tiny_classifier, tiny_batch):
    """grad_terms_every: the logged per-term norms and shares match gradients of the terms taken apart, and the
    total is the norm of the gradient that backward of the step's loss gives (an independent computation)."""
    fresh = copy.deepcopy(tiny_classifier)
    rec = _grace(tiny_classifier, awp="uniform", gram_volume=True, lambda_gv=5.0, lambda_lar=2.0,
                 grad_terms_every=1)
    out = rec.training_step(tiny_batch, CPU)
    params = rec.trainable_parameters()
    out.loss.backward()
    total = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None) ** 0.5
    logs = out.logs
    assert logs["gnorm_total"] == pytest.approx(total, rel=1e-4)
    assert logs["gshare_task"] + logs["gshare_lar"] + logs["gshare_gv"] == pytest.approx(1.0, abs=1e-6)
    assert all(logs[f"gnorm_{t}"] > 0 for t in ("task", "lar", "gv"))
    quiet = _grace(fresh, awp="uniform", gram_volume=True, grad_terms_every=2).training_step(tiny_batch, CPU)
    assert "gnorm_total" not in quiet.logs  # step 1 is not a multiple of 2

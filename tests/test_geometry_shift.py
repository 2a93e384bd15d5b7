"""Geometry estimators against a quadratic loss (Hessian known in closed form); Mahalanobis shift against numpy."""
import numpy as np
import pytest
import torch

from eval_suites import geometry as G
from eval_suites import shift as S


def _quadratic(a: torch.Tensor, sizes=(3, 2)):
    """loss(theta) = 0.5 theta^T A theta + b^T theta over two parameter tensors ("layers"); Hessian = A."""
    torch.manual_seed(0)
    params = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in sizes]
    b = torch.randn(a.shape[0], dtype=torch.float64)

    def loss_fn():
        t = torch.cat(params)
        return 0.5 * t @ a @ t + b @ t

    return params, loss_fn


def _spd(d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    return m @ m.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_hvp_equals_a_v():
    a = _spd()
    params, loss_fn = _quadratic(a)
    v = [torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    hv = torch.cat(G.hvp(loss_fn, params, v))
    assert torch.allclose(hv, a @ torch.cat(v))


def test_top_eigenvalue_power_iteration():
    a = _spd()
    params, loss_fn = _quadratic(a)
    top = float(torch.linalg.eigvalsh(a).max())
    assert G.top_hessian_eigenvalue(loss_fn, params, iters=500, tol=1e-10) == pytest.approx(top, rel=1e-6)


def test_power_iteration_reports_its_convergence():
    """The eigenvalue with how it was reached: iterations, the last relative change, converged only within tol."""
    a = torch.diag(torch.tensor([4.0, 1.0, 0.5, 0.25, 0.1], dtype=torch.float64))
    params, loss_fn = _quadratic(a)
    out = G.power_iteration(loss_fn, params, iters=500, tol=1e-10)
    assert out["eigenvalue"] == pytest.approx(4.0, rel=1e-8) and out["converged"] and out["rel_change"] <= 1e-10
    assert 2 <= out["iterations"] < 500
    short = G.power_iteration(loss_fn, params, iters=2, tol=1e-14)
    assert short["iterations"] == 2 and not short["converged"] and short["rel_change"] > 1e-14


def test_hessian_of_an_adversarial_loss_against_its_closed_form():
    """A linear model w on fixed adversarial inputs x_adv (found once, then held), squared loss
    0.5 sum_i (w.x_adv_i - y_i)^2: its Hessian in w is X_adv^T X_adv whatever w is, so power iteration and Hutchinson
    must give that matrix's top eigenvalue and trace (numpy), not the clean inputs' ones."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    eps = 0.3
    with torch.enable_grad():  # one FGSM step on the inputs: the adversarial view, then fixed
        xi = x.clone().requires_grad_(True)
        (0.5 * ((xi @ w - y) ** 2).sum()).backward()
        x_adv = (x + eps * xi.grad.sign()).detach()
    w.grad = None

    def loss_fn():
        return 0.5 * ((x_adv @ w - y) ** 2).sum()

    h = (x_adv.T @ x_adv).numpy()
    top = G.power_iteration(loss_fn, [w], iters=1000, tol=1e-12)
    assert top["converged"] and top["eigenvalue"] == pytest.approx(float(np.linalg.eigvalsh(h).max()), rel=1e-8)
    assert G.hutchinson_trace(loss_fn, [w], n_samples=4000) == pytest.approx(float(np.trace(h)), rel=0.05)
    clean = float(np.linalg.eigvalsh((x.T @ x).numpy()).max())
    assert abs(top["eigenvalue"] - clean) > 1e-3 * clean  # the adversarial loss's curvature, not the clean one's


def test_trace_frobenius_layerwise_exact_on_diagonal():
    """With a diagonal Hessian a single Rademacher probe is exact: v^T A v = tr A, ||A v||^2 = ||A||_F^2."""
    diag = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0], dtype=torch.float64)
    params, loss_fn = _quadratic(torch.diag(diag))
    assert G.hutchinson_trace(loss_fn, params, n_samples=1) == pytest.approx(float(diag.sum()))
    assert G.hessian_frobenius_normalised(loss_fn, params, n_samples=1) == pytest.approx(
        float(diag.norm()) / 5 ** 0.5)
    lw = G.layerwise_curvature(loss_fn, {"l0": [params[0]], "l1": [params[1]]}, n_samples=1)
    assert lw == pytest.approx({"l0": 6.0 / 3, "l1": 30.0 / 2})


def test_trace_frobenius_unbiased_on_dense():
    a = _spd()
    params, loss_fn = _quadratic(a)
    assert G.hutchinson_trace(loss_fn, params, n_samples=3000) == pytest.approx(float(torch.trace(a)), rel=0.05)
    assert G.hessian_frobenius_normalised(loss_fn, params, n_samples=3000) == pytest.approx(
        float(a.norm()) / 5 ** 0.5, rel=0.05)
    lw = G.layerwise_curvature(loss_fn, {"l0": [params[0]], "l1": [params[1]]}, n_samples=3000)
    assert lw["l0"] == pytest.approx(float(torch.trace(a[:3, :3])) / 3, rel=0.05)
    assert lw["l1"] == pytest.approx(float(torch.trace(a[3:, 3:])) / 2, rel=0.05)


def test_centroid_cosine_and_drift():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ya, yb = torch.tensor([0, 0, 1]), torch.tensor([0, 1])
    # class 0: cos((1,0), (1,1)/sqrt2) = 1/sqrt2; class 1: cos((0,1),(0,1)) = 1
    assert G.class_centroid_cosine(a, ya, b, yb) == pytest.approx((2 ** -0.5 + 1) / 2)
    s0 = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    s1 = {"w": torch.tensor([3.0, 5.0]), "b": torch.tensor([0.0])}
    assert G.relative_drift(s1, s0) == pytest.approx(1 / 5)


def test_lid_mle_matches_formula_and_dimension():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 3, generator=g, dtype=torch.float64)
    k = 10
    d = np.sort(np.linalg.norm(x.numpy()[:, None] - x.numpy()[None], axis=-1), axis=1)[:, 1:k + 1]
    direct = np.mean(-1.0 / np.mean(np.log(d / d[:, -1:]), axis=1))
    assert G.lid_mle(x, k) == pytest.approx(direct)
    # points on a 3-d cube embedded in 10-d: LID near 3, well below 10
    emb = torch.cat([x, torch.zeros(400, 7, dtype=torch.float64)], 1) @ torch.linalg.qr(
        torch.randn(10, 10, generator=g, dtype=torch.float64))[0]
    assert 2.3 < G.lid_mle(emb, 20) < 3.7
    assert G.delta_lid(emb, emb, 20) == 0.0


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(0)
    z_id = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4))
    z_ood = rng.normal(loc=2.0, size=(50, 4))
    fit = S.fit_gaussian(z_id, ridge=1e-8)
    mu = z_id.mean(0)
    cov = (z_id - mu).T @ (z_id - mu) / (len(z_id) - 1)
    prec = np.linalg.inv(cov + 1e-8 * np.eye(4))
    direct = np.array([np.sqrt((z - mu) @ prec @ (z - mu)) for z in z_ood])
    assert np.allclose(S.mahalanobis(z_ood, fit), direct)
    assert S.set_shift(z_ood, fit) == pytest.approx(direct.mean())


def _pearson_closed_form(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / np.sqrt((dx * dx).sum() * (dy * dy).sum()))


def test_shift_summary_order_and_correlations():
    rng = np.random.default_rng(1)
    z_id = rng.normal(size=(300, 3))
    sets = {f"s{i}": {"image": rng.normal(loc=loc, size=(100, 3))} for i, loc in enumerate([0.1, 3.0, 0.5, 6.0])}
    drop = {"s0": 1.0, "s1": 20.0, "s2": 2.0, "s3": 30.0}
    out = S.shift_summary({"image": z_id}, sets, drop)["image"]
    assert out["order"] == ["s0", "s2", "s1", "s3"]
    assert out["near"] == ["s0", "s2", "s1"] and out["far"] == ["s3"]  # largest gap: s1 -> s3
    xs = [out["scores"][k] for k in drop]
    assert out["pearson"] == pytest.approx(_pearson_closed_form(xs, list(drop.values())))
    assert out["spearman"] == pytest.approx(1.0)  # the scores order the sets exactly as the drops do
    # ties share their mean rank: ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4)
    assert S.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(_pearson_closed_form([1, 2.5, 2.5, 4], [1, 3, 2, 4]))
    assert S.pearson([1, 2], [3, 3]) is None and S.spearman([1], [2]) is None  # undefined: constant, one point


def test_relative_drift_is_one_function_with_the_limits_of_the_ratio():
    """One definition (weightspace); ||θ - θ0|| / ||θ0|| in float64 over shared floating tensors of equal shape; no
    change is 0 even for a zero reference, a change away from a zero reference is inf, nothing shared is an error."""
    from grace_plugin.weightspace import relative_drift

    assert G.relative_drift is relative_drift
    s0 = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(3), "other": torch.zeros(3)}
    s1 = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9), "other": torch.zeros(4), "extra": torch.ones(2)}
    assert relative_drift(s1, s0) == pytest.approx(1 / 5)  # only "w": ints, other shapes, unshared keys left out
    assert relative_drift(s1, s0, keys=["w"]) == pytest.approx(1 / 5)
    zero = {"w": torch.zeros(2)}
    assert relative_drift(zero, zero) == 0.0
    assert relative_drift({"w": torch.tensor([0.0, 1e-3])}, zero) == float("inf")
    with pytest.raises(ValueError, match="no shared"):
        relative_drift({"a": torch.ones(1)}, {"b": torch.ones(1)})

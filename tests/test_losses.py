import math

import pytest
import torch
import torch.nn.functional as F

from grace_plugin.losses import gram_volume, pairwise_cosines


def _unit_vectors_with_cosines(a, b, c, dim=5):
    """Three unit vectors with cos(1,2)=a, cos(1,3)=b, cos(2,3)=c, via a Cholesky factor of their Gram matrix."""
    g = torch.tensor([[1, a, b], [a, 1, c], [b, c, 1]], dtype=torch.float64)
    L = torch.linalg.cholesky(g)  # rows of L are vectors in R^3 with Gram matrix g
    v = torch.zeros(3, dim, dtype=torch.float64)
    v[:, :3] = L
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    return (v @ q).float()  # rotate: Gram matrix unchanged


@pytest.mark.parametrize("a,b,c", [(0.3, 0.5, 0.1), (0.9, 0.8, 0.85), (0.0, 0.0, 0.0), (-0.2, 0.4, 0.6)])
def test_gram_volume_matches_closed_form(a, b, c):
    v = _unit_vectors_with_cosines(a, b, c)
    vol = gram_volume(v[0:1], v[1:2], v[2:3], eps=0.0)
    expected = math.sqrt(1 + 2 * a * b * c - a * a - b * b - c * c)
    assert vol.item() == pytest.approx(expected, abs=1e-5)


def test_gram_volume_equals_det_for_random_batches():
    torch.manual_seed(0)
    f = [torch.randn(7, 16) for _ in range(3)]
    u = torch.stack([F.normalize(x, dim=-1) for x in f], 1).double()
    ref = torch.linalg.det(u @ u.transpose(1, 2) + 1e-3 * torch.eye(3, dtype=torch.float64)).abs().sqrt()
    assert torch.allclose(gram_volume(*f, eps=1e-3).double(), ref, atol=1e-5)


def test_gram_volume_zero_for_identical_and_coplanar():
    x = torch.randn(4, 8)
    assert gram_volume(x, x, x, eps=0.0).max().item() < 1e-3
    y = torch.randn(4, 8)
    assert gram_volume(x, y, 2 * x - 3 * y, eps=0.0).max().item() < 1e-3  # coplanar: volume 0 too


def test_gram_volume_gradient_finite_with_eps():
    x = torch.randn(3, 8, requires_grad=True)
    gram_volume(x, x.detach() + 0.0, x.detach() * 2, eps=1e-6).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_pairwise_cosines():
    x, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert pairwise_cosines(x, y, x) == pytest.approx((0.0, 1.0, 0.0))


# ----------------------------------------------------------------------------- Gram volume near alignment
def _near_aligned(n=16, d=32, angle=1e-4, seed=0):
    """Three views within ``angle`` radians of one another (as clean/adv/AWP features become once aligned)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [base + angle * base.norm(dim=-1, keepdim=True) * torch.randn(n, d, generator=g, dtype=torch.float64)
            for _ in range(3)]


def _reference_volume(views, eps):
    """Float64 reference: sqrt(det(G + eps I)) through torch.linalg.det (LU), not the cofactor expansion."""
    u = torch.stack([torch.nn.functional.normalize(v, dim=-1) for v in views], 1)
    g = u @ u.transpose(1, 2) + eps * torch.eye(len(views), dtype=torch.float64)
    return torch.linalg.det(g).sqrt()


@pytest.mark.parametrize("angle", [1e-2, 1e-4, 1e-6, 0.0])
@pytest.mark.parametrize("k", [2, 3])
def test_gram_volume_value_and_gradient_near_alignment_match_float64(angle, k):
    """From float32 features (as the recipe passes them), the volume and its gradient w.r.t. the features match a
    float64 LU reference, and are finite, also at exact alignment; the float32 cofactor expansion that GRACE used
    before rounds det G to <= 0 there (sqrt' = inf)."""
    eps = 1e-6
    views64 = _near_aligned(angle=angle)
    if angle == 0.0:
        views64 = [views64[0]] * 3
    views64 = views64[:k]
    views32 = [v.float().requires_grad_(True) for v in views64]
    got = gram_volume(*views32, eps=eps) if k == 3 else gram_volume(views32[0], views32[1], None, eps)
    ref_in = [v.float().double().requires_grad_(True) for v in views64]  # the same float32-rounded inputs
    ref = _reference_volume(ref_in, eps)
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-9)
    got.sum().backward()
    ref.sum().backward()
    for a, b in zip(views32, ref_in):
        assert torch.isfinite(a.grad).all()
        assert torch.allclose(a.grad.double(), b.grad, rtol=1e-3, atol=1e-6 * float(b.grad.abs().max()) + 1e-9)
    if k == 3 and angle <= 1e-4:  # float32 cannot resolve det G here
        u = torch.stack([torch.nn.functional.normalize(v.detach(), dim=-1) for v in views32], 1)
        g = u @ u.transpose(1, 2) + eps * torch.eye(3)
        det32 = torch.linalg.det(g)
        true = ref.detach() ** 2
        assert float(((det32.double() - true) / true).abs().max()) > 0.05  # float32 is off by > 5% here


def test_gram_volume_zero_weight_cannot_poison_a_step():
    """At exact alignment the volume's gradient is finite, so 0 * L_GV adds exactly zero gradient."""
    x = torch.randn(4, 8, requires_grad=True)
    (0.0 * gram_volume(x, x * 1.0, x * 2.0, eps=1e-6).sum() + x.sum()).backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# ------------------------------------------------------------------------------------------ feature spread
def test_feature_spread_on_constructed_features():
    from grace_plugin.losses import feature_spread, feature_sums, spread_from_sums

    eye = torch.eye(5)
    assert feature_spread(eye) == pytest.approx(0.0, abs=1e-12)  # orthogonal: no shared direction
    assert feature_spread(torch.ones(7, 3) * torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(1.0)  # collapsed
    assert feature_spread(torch.cat([eye[:1], -eye[:1]])) == pytest.approx(-1.0)
    f = torch.randn(50, 16, dtype=torch.float64)
    u = torch.nn.functional.normalize(f, dim=-1)
    cos = u @ u.t()
    brute = float((cos.sum() - cos.diag().sum()) / (50 * 49))
    assert feature_spread(f) == pytest.approx(brute, abs=1e-12)
    parts = [feature_sums(f[:13]), feature_sums(f[13:31]), feature_sums(f[31:])]  # batches or ranks combine
    assert spread_from_sums(sum(p[0] for p in parts), sum(p[1] for p in parts)) == pytest.approx(brute, abs=1e-12)
    assert feature_spread(f[:1]) is None

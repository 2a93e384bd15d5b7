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

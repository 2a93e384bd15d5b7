import pytest
import torch
from torch import nn

from grace_plugin.models.lora import LoRALinear
from grace_plugin.perturbation import awp_branch, perturbed


def test_perturbed_restores_bit_for_bit_even_on_error():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    before = [p.detach().clone() for p in lin.parameters()]
    deltas = [torch.randn_like(p) * 1e-3 for p in lin.parameters()]  # small: x + d - d != x in float
    with pytest.raises(RuntimeError):
        with perturbed(lin.parameters(), deltas):
            assert not torch.equal(lin.weight, before[0])
            raise RuntimeError("step failed")
    assert all(torch.equal(p, b) for p, b in zip(lin.parameters(), before))


def test_awp_branch_changes_output_then_restores_exactly():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(6, 9), rank=2, alpha=2.0, splits=3, awp_rank=2)
    x = torch.randn(4, 6)
    ref = m(x)
    with pytest.raises(KeyError):
        with awp_branch([m]):
            m.awp_A = torch.randn(2, 6)
            m.awp_B = torch.randn(9, 2)
            m.awp_mask = torch.tensor([1.0, 0.0])
            out = m(x)
            expected = ref + x @ ((m.awp_B * m.awp_mask) @ m.awp_A).t()
            assert torch.allclose(out, expected, atol=1e-5)
            raise KeyError("boom")
    assert not m.awp_enabled
    assert torch.equal(m(x), ref)


def test_awp_branch_graph_survives_exit():
    """Backward after the block must work: the factors are rebound, not zeroed in place."""
    m = LoRALinear(nn.Linear(4, 4), rank=2, alpha=2.0, awp_rank=2)
    with awp_branch([m]):
        m.awp_A, m.awp_B, m.awp_mask = torch.randn(2, 4), torch.randn(4, 2), torch.ones(2)
        y = m(torch.randn(3, 4)).sum()
    y.backward()
    assert m.lora_A.grad is not None


# ------------------------------------------------------------------------------------- rank-r ascent (LAR-AWP)
def _matrix(out=40, inp=30, decay=0.7, seed=0):
    """A matrix with known, distinct singular values decay**i."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    s = torch.tensor([decay ** i for i in range(min(out, inp))], dtype=torch.float64)
    return (u[:, :len(s)] * s) @ v[:, :len(s)].t(), s


@pytest.mark.parametrize("shape", [(40, 30), (300, 200)])  # exact SVD path; randomized range finder path
@pytest.mark.parametrize("r", [1, 2, 4])
def test_low_rank_ascent_is_the_truncated_svd_maximiser(shape, r):
    """max <g, Δ> over rank <= r and ||Δ||_F <= ρ is ρ ||S_r||_F (Eckart-Young-Mirsky), attained at ρ U_r S_r V_r^T /
    ||S_r||_F: the factors give that Δ (against numpy's SVD), on the bound, and no random rank-r Δ on the ball beats
    it."""
    import numpy as np

    from grace_plugin.perturbation import low_rank_ascent

    g64, s = _matrix(*shape)
    g = g64.float()
    rho = 0.3
    b, a = low_rank_ascent(g, r, rho, torch.Generator().manual_seed(1))
    d = (b @ a).double()
    u_np, s_np, vt_np = np.linalg.svd(g64.numpy())
    want = rho * (u_np[:, :r] * s_np[:r]) @ vt_np[:r] / np.linalg.norm(s_np[:r])
    assert np.allclose(d.numpy(), want, atol=1e-4 * rho)  # float32 SVD
    assert float(d.norm()) == pytest.approx(rho, rel=1e-5)
    best = float((g64 * d).sum())
    assert best == pytest.approx(rho * float(s[:r].norm()), rel=1e-4)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        rb, ra = torch.randn(shape[0], r, generator=gen, dtype=torch.float64), torch.randn(r, shape[1], generator=gen,
                                                                                          dtype=torch.float64)
        rand = rb @ ra
        rand = rand * (rho / rand.norm())
        assert float((g64 * rand).sum()) < best


def test_low_rank_ascent_zero_gradient_and_projection():
    from grace_plugin.perturbation import low_rank_ascent, low_rank_projection

    b, a = low_rank_ascent(torch.zeros(20, 10), 2, 0.5)
    assert float((b @ a).abs().max()) == 0.0
    g64, s = _matrix(20, 10)
    b, a = low_rank_projection(g64.float(), 2, 10.0)  # inside the ball: the truncated SVD itself
    assert float((b @ a).norm()) == pytest.approx(float(s[:2].norm()), rel=1e-5)
    b, a = low_rank_projection(g64.float(), 2, 0.1)  # outside: rescaled onto it
    assert float((b @ a).norm()) == pytest.approx(0.1, rel=1e-5)


def test_top_singular_is_deterministic_given_a_generator():
    """The randomized path draws only from the generator it is given (the global RNG is untouched)."""
    from grace_plugin.perturbation import top_singular

    g, _ = _matrix(300, 200)
    state = torch.random.get_rng_state()
    one = top_singular(g.float(), 3, torch.Generator().manual_seed(5))
    two = top_singular(g.float(), 3, torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_full_rank_gradient_is_the_weight_gradient():
    """G_W from a LoRA layer's recorded input and the gradient w.r.t. its recorded output equals autograd's
    gradient w.r.t. the (frozen) base weight."""
    from grace_plugin.models.lora import LoRALinear
    from grace_plugin.recipes.lar_awp import full_rank_gradient

    torch.manual_seed(0)
    m = LoRALinear(torch.nn.Linear(6, 9), rank=2, alpha=4.0, awp_rank=2)
    torch.nn.init.normal_(m.lora_B)
    x = torch.randn(4, 5, 6)
    m.awp_record = True
    m.base.weight.requires_grad_(True)
    loss = m(x).square().sum()
    xin, yout = m.awp_io
    (g_out,) = torch.autograd.grad(loss, [yout], retain_graph=True)
    (g_w,) = torch.autograd.grad(loss, [m.base.weight])
    assert torch.allclose(full_rank_gradient(xin, g_out), g_w, atol=1e-5)

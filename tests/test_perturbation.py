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

"""Registry-driven attack invariants (every registered attack, no edits needed for a new one)."""
import pytest
import torch

from eval_suites.attacks import create_attack, list_attacks, parse_eps


@pytest.mark.parametrize("name", list_attacks())
def test_attack_invariants(name, tiny_classifier, tiny_batch):
    model = tiny_classifier.eval()
    x, y = tiny_batch["image"], tiny_batch["label"]
    eps = 8 / 255
    x_adv = create_attack(name, model, eps=eps)(x, y)
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (model(x).argmax(-1) == y)
        robust = (model(x_adv).argmax(-1) == y)
    assert robust.sum() <= clean.sum()
    assert torch.equal(create_attack(name, model, eps=0.0)(x, y), x)


@pytest.mark.parametrize("text,val", [("4/255", 4 / 255), ("0.5", 0.5), (0.25, 0.25)])
def test_parse_eps(text, val):
    assert parse_eps(text) == pytest.approx(val)


@pytest.mark.parametrize("bad", ["four", "4/0", "-1", "nan"])
def test_parse_eps_rejects(bad):
    with pytest.raises(ValueError, match="bad eps"):
        parse_eps(bad)

"""Registry-driven attack invariants (every registered attack and norm, no edits needed for a new one)."""
import pytest
import torch

from eval_suites.attacks import create_attack, format_eps, get_attack, list_attacks, parse_eps


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_clip_dir):  # session fixtures are built first, at the default thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # attacks on a tiny model are many tiny ops: threads only contend on 2 shared cores
    yield
    torch.set_num_threads(n)


CASES = [(name, norm) for name in list_attacks() for norm in get_attack(name).norms]


@pytest.mark.parametrize("name,norm", CASES)
def test_attack_invariants(name, norm, tiny_classifier, tiny_batch):
    model = tiny_classifier.eval()
    x, y = tiny_batch["image"][:4], tiny_batch["label"][:4]
    eps = 8 / 255 if norm == "Linf" else 0.5
    x_adv = create_attack(name, model, eps=eps, norm=norm)(x, y)
    assert x_adv.shape == x.shape
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "Linf" else d.norm(dim=1)
    assert size.max().item() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = (model(x).argmax(-1) == y)
        robust = (model(x_adv).argmax(-1) == y)
    assert robust.sum() <= clean.sum()
    assert torch.equal(create_attack(name, model, eps=0.0, norm=norm)(x, y), x)


@pytest.mark.parametrize("text,val", [("4/255", 4 / 255), ("0.5", 0.5), (0.25, 0.25)])
def test_parse_eps(text, val):
    assert parse_eps(text) == pytest.approx(val)
    assert parse_eps(format_eps(val)) == pytest.approx(val)


@pytest.mark.parametrize("bad", ["four", "4/0", "-1", "nan"])
def test_parse_eps_rejects(bad):
    with pytest.raises(ValueError, match="bad eps"):
        parse_eps(bad)


def test_format_eps():
    assert format_eps(4 / 255) == "4/255" and format_eps(0.5) == "0.5"


def test_pyautoattack_options_reach_the_attack(tiny_classifier, tiny_batch, monkeypatch):
    """The one pyautoattack factory: an entry's options set the named component's attribute before the run
    (n_iter/n_restarts on APGD, n_queries on Square); an unknown option is refused with the valid ones."""
    import pyautoattack

    seen = {}

    def fake_run(self, x, y, batch_size=None, **kw):
        seen.update(n_iter=self.apgd.n_iter, n_restarts=self.apgd.n_restarts, n_queries=self.square.n_queries,
                    attacks=list(self.attacks_to_run or []), version=self.version)
        return x.clone(), y

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", fake_run)
    model = tiny_classifier.eval()
    x, y = tiny_batch["image"][:2], tiny_batch["label"][:2]
    create_attack("apgd-ce", model, eps=4 / 255, n_iter=7, n_restarts=2)(x, y)
    assert (seen["n_iter"], seen["n_restarts"], seen["attacks"]) == (7, 2, ["apgd-ce"])
    create_attack("apgd-dlr", model, eps=4 / 255)(x, y)
    assert (seen["n_iter"], seen["n_restarts"], seen["attacks"]) == (100, 1, ["apgd-dlr"])  # AutoAttack standard
    create_attack("square", model, eps=4 / 255, n_queries=11)(x, y)
    assert (seen["n_queries"], seen["attacks"]) == (11, ["square"])
    create_attack("autoattack", model, eps=4 / 255)(x, y)
    assert seen["version"] == "standard"
    with pytest.raises(TypeError, match="valid: n_iter, n_restarts"):
        create_attack("apgd-ce", model, eps=4 / 255, n_queries=5)

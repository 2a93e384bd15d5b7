"""`grace study controls`: the positive controls' arithmetic (overfitting curve, tail means, paired checks with a
minimal effect), the registry, and a tiny end-to-end run that is reused, judged and published."""
import json

import pytest
from scipy import stats

from grace_app.cli import main
from grace_app.studies import controls as C


def test_overfit_curve_by_hand():
    checks = [{"step": 99, "val_clean": 50.0, "val_robust": 20.0, "train_clean": 55.0, "train_robust": 22.0},
              {"step": 199, "val_clean": 60.0, "val_robust": 30.0, "train_clean": 70.0, "train_robust": 35.0},
              {"step": 299, "val_clean": 62.0, "val_robust": 30.0, "train_clean": 80.0, "train_robust": 45.0},
              {"step": 399, "val_clean": 64.0, "val_robust": 26.5, "train_clean": 90.0, "train_robust": 60.0}]
    out = C.overfit_curve(checks)
    assert (out["best_robust"], out["best_step"], out["last_robust"]) == (30.0, 199, 26.5)  # tie: the earlier
    assert out["drop"] == pytest.approx(3.5) and out["gap_last"] == pytest.approx(33.5)
    assert out["gap_best"] == pytest.approx(5.0) and out["train_rise"] == pytest.approx(25.0)
    assert C.overfit_curve([]) == {}


def test_tail_mean_reads_the_last_third_of_the_lines_that_have_the_key():
    lines = [{"a": float(i)} if i % 2 == 0 else {"b": 1.0} for i in range(12)]  # a = 0, 2, ..., 10
    assert C.tail_mean(lines, "a") == pytest.approx((8 + 10) / 2)
    assert C.tail_mean(lines, "missing") is None


def _rows(base: list[float], arm: list[float]) -> list[dict]:
    return [{"arm": "b", "seed": s, "x": v} for s, v in enumerate(base)] + \
        [{"arm": "a", "seed": s, "x": v} for s, v in enumerate(arm)]


def test_paired_check_verdicts_against_an_independent_t_interval():
    base, arm = [1.0, 2.0, 3.0], [2.0, 3.5, 4.1]
    d = [x - y for x, y in zip(arm, base)]
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=sum(d) / 3, scale=stats.sem(d))
    c = C._versus(_rows(base, arm), "x", "a", "b", +1, "rises")
    assert c["verdict"] == "passes" and f"[{lo:+.3g}, {hi:+.3g}]" in c["numbers"]
    assert C._versus(_rows(base, arm), "x", "a", "b", -1, "falls")["verdict"] == "fails"
    # the same significant rise below a minimal effect is negligible, not a pass (absolute and relative to the base)
    assert C._versus(_rows(base, arm), "x", "a", "b", +1, "rises", 2.0)["verdict"].startswith("negligible")
    assert C._versus(_rows(base, arm), "x", "a", "b", +1, "rises", 0.7, relative=True)["verdict"].startswith(
        "negligible")  # mean difference 1.2 < 0.7 x mean(base) = 1.4
    assert C._versus(_rows(base, arm), "x", "a", "b", +1, "rises", 0.5, relative=True)["verdict"] == "passes"
    noisy = C._versus(_rows(base, [2.0, 1.0, 4.5]), "x", "a", "b", +1, "rises")
    assert noisy["verdict"] == "inconclusive"
    one = C._versus(_rows([1.0], [3.0]), "x", "a", "b", +1, "rises")
    assert one["verdict"] == "inconclusive" and "1 seed (no interval)" in one["numbers"]


def test_any_dose_passes_when_some_dose_passes():
    rows = _rows([1.0, 2.0, 3.0], [1.1, 1.9, 3.0]) + [{"arm": "c", "seed": s, "x": v}
                                                      for s, v in enumerate([3.0, 4.1, 5.0])]
    c = C._any_dose(rows, "x", "b", +1, "rises")
    assert c["verdict"] == "passes (at c)" and c["numbers"].count("paired 95% t") == 2


def test_registry_names_every_control_and_its_arms():
    assert set(C.CONTROLS) == {"awp-dose", "overfit", "ranks", "volume"}
    for c in C.CONTROLS.values():
        labels = [a.label for a in c.arms()]
        assert len(labels) == len(set(labels)) >= 3
    assert C.CONTROLS["overfit"].arms()[0].overrides["recipe"]["pgd_steps"] == 10


def _smoke(tmp_path, control: str, lane: list[str], arms: list[str], capsys) -> dict:
    """A lane (some arms) is trained and measured but not judged; the full invocation reuses its runs and
    measurements, judges and writes the page."""
    out = tmp_path / "ctl"
    cfg = C.ControlsConfig(out=out, controls=[control], run_seeds=[0, 1], steps=2, n_adv=8, n_geometry=8,
                           geometry_iters=2, size="small", pretrain_steps=10, arms=lane)
    C.run_controls(cfg)
    assert "not judged" in capsys.readouterr().out
    assert control not in json.loads((out / "controls.json").read_text())["controls"]
    cfg.arms = None
    doc = C.run_controls(cfg)
    assert capsys.readouterr().out.count("reusing the finished run") == 2 * len(lane)
    c = doc["controls"][control]
    assert [r["arm"] for r in c["rows"][:len(arms)]] == arms
    assert all(k["verdict"].split()[0] in ("passes", "fails", "inconclusive", "negligible", "reported")
               for k in c["checks"])
    assert "| check | verdict | numbers |" in (out / "controls.md").read_text()
    return doc


def test_controls_smoke_reused_judged_and_published(tmp_path, capsys):
    doc = _smoke(tmp_path, "awp-dose", ["rho0x"], ["rho0x", "rho1x", "rho4x", "rho16x"], capsys)
    rows = doc["controls"]["awp-dose"]["rows"]
    assert all(r["power_iters"] <= 2 and r["lambda_max_adv"] is not None for r in rows)
    assert all(r["delta_l"] == 0 for r in rows if r["arm"] == "rho0x")  # awp zero: the view is unperturbed
    out, data, pages = tmp_path / "ctl", tmp_path / "data", tmp_path / "pages"
    assert main(["results", "--add", str(out), "--data", str(data), "--out", str(pages), "--mkdocs", ""]) == 0
    assert "LAR-AWP's dose-response" in (pages / "controls.md").read_text()
    assert main(["study", "controls", "--control", "nope", "--out", str(out)]) == 2
    assert main(["study", "controls", "--methods", "grace", "--out", str(out)]) == 2
    assert main(["study", "table6", "--arms", "gv0", "--out", str(out)]) == 2


@pytest.mark.slow
def test_volume_control_smoke(tmp_path, capsys):
    doc = _smoke(tmp_path, "volume", ["gv0", "gv100"], ["gv0", "gv-tuned", "gv1", "gv10", "gv100"], capsys)
    rows = doc["controls"]["volume"]["rows"]
    assert all(r["gshare_gv"] is not None for r in rows if r["arm"] != "gv0")
    assert all(r["centroid_ood"] is not None and r["ood"] is not None for r in rows)


def test_flatness_counts_only_where_the_model_still_works():
    """A collapsed model has a flat loss too: a dose passes only when lambda_max falls by >= 10% and ID stays within
    ID_COST points of rho = 0 (the paired interval's lower end)."""
    def arm(name, lam, ids):
        return [{"arm": name, "seed": s, "lambda_max_adv": lam + s, "id": v} for s, v in enumerate(ids)]

    rows = arm("rho0x", 70.0, [60.0, 62.0, 61.0]) + arm("rho4x", 40.0, [59.0, 61.5, 60.0]) + \
        arm("rho16x", 20.0, [10.0, 14.0, 8.0])
    c = C._flat_and_working(rows)
    assert c["verdict"] == "passes (at rho4x)" and "rho16x: moved, ID -50.3" in c["numbers"]
    collapsed = arm("rho0x", 70.0, [60.0, 62.0, 61.0]) + arm("rho16x", 20.0, [10.0, 14.0, 8.0])
    assert C._flat_and_working(collapsed)["verdict"] == "fails"


def test_volume_alignment_is_judged_on_the_misalignment():
    """cos 0.990 -> 0.997 is a 70% fall of 1 - cos (passes), though the cosine rose by less than 0.01."""
    def arm(name, cos, ids):
        return [{"arm": name, "seed": s, "cos_id_adv": cos + 1e-4 * s, "id": v, "ood": 30.0 + s}
                for s, v in enumerate(ids)]

    rows = arm("gv0", 0.990, [60.0, 62.0, 61.0]) + arm("gv100", 0.997, [59.0, 61.0, 61.0])
    checks = {c["check"]: c for c in C._judge_volume(rows)}
    assert next(c for k, c in checks.items() if "f_Adv" in k)["verdict"] == "passes (at gv100)"
    assert next(c for k, c in checks.items() if k.startswith("OOD top-1"))["verdict"] == "inconclusive"

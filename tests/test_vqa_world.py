"""The embedded VQA world (grace_app/testbed/vqa_world.py): deterministic, and each set's construction invariant
holds on every question, recomputed from the scene graph stored in its record."""
import hashlib
from collections import Counter

import pytest

from grace_app.testbed.vqa_world import (ID_PRIOR, SETS, VqaWorldSpec, answer_of, question_text,
                                         write_vqa_world)
from grace_plugin.data.shards import open_shard_set
from grace_plugin.vqa.accuracy import question_accuracy
from grace_plugin.vqa.data import read_records


@pytest.fixture(scope="module")
def vqa_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa_world")
    write_vqa_world(out, seed=0, spec=VqaWorldSpec.small())
    return out


def _records(world, name, split="test"):
    return read_records(open_shard_set(world / name, split=split).urls)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_deterministic_and_complete(vqa_world, tmp_path):
    write_vqa_world(tmp_path / "again", seed=0, spec=VqaWorldSpec.small())
    assert _digest(vqa_world) == _digest(tmp_path / "again")
    spec = VqaWorldSpec.small()
    for name, group, split, size, _ in SETS:
        s = open_shard_set(vqa_world / name, split=split)
        assert s.layout == "vqa" and s.meta["info"]["group"] == group
        assert len(read_records(s.urls)) == getattr(spec, size)


@pytest.mark.parametrize("name,split", [(n, s) for n, _, s, _, _ in SETS])
def test_every_answer_follows_from_its_scene(vqa_world, name, split):
    for r in _records(vqa_world, name, split):
        if r["answer"] != "unanswerable":
            assert answer_of(r["scene"], r["kind"], r["slots"]) == r["answer"], r
        assert question_accuracy(r["answer"], r["answers"]) == 1.0  # 6+ of 10 annotators agree
        assert r["question"] == question_text(r["kind"], r["slots"], name == "vqa-rephrasings")


def test_iv_removes_an_irrelevant_object(vqa_world):
    for r in _records(vqa_world, "iv-vqa"):
        assert len(r["scene"]) == len(r["base_scene"]) - 1 and r["answer"] == r["base_answer"]


def test_cv_removes_a_counted_object(vqa_world):
    for r in _records(vqa_world, "cv-vqa"):
        assert r["kind"] == "count" and int(r["answer"]) == int(r["base_answer"]) - 1


def test_rephrasings_use_held_out_templates(vqa_world):
    id_questions = {r["question"] for r in _records(vqa_world, "vqav2", "train")}
    assert not id_questions & {r["question"] for r in _records(vqa_world, "vqa-rephrasings")}


def test_answer_priors_flip_in_vqa_cp(vqa_world):
    def dist(recs, kind):
        c = Counter(r["answer"] for r in recs if r["kind"] == kind)
        n = sum(c.values())
        return {a: v / n for a, v in c.items()}

    train, cp = _records(vqa_world, "vqav2", "train"), _records(vqa_world, "vqa-cp")
    for kind in ("count", "exist"):
        a, b = dist(train, kind), dist(cp, kind)
        tv = sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b)) / 2
        assert tv > 0.3, (kind, a, b)


def test_vqa_ce_breaks_the_circle_shortcut(vqa_world):
    train = [r for r in _records(vqa_world, "vqav2", "train") if r["kind"] == "colour"
             and r["slots"]["shape"] == "circle"]
    assert sum(r["answer"] == "red" for r in train) / len(train) > 0.6  # the ID shortcut (ID_PRIOR: 0.8)
    ce = _records(vqa_world, "vqa-ce")
    assert ce and all(r["slots"]["shape"] == "circle" and r["answer"] != "red" for r in ce)
    assert ID_PRIOR["circle_red"] == 0.8


def test_advqa_fools_the_blind_reference(vqa_world):
    from collections import defaultdict

    by_q = defaultdict(Counter)
    for r in _records(vqa_world, "vqav2", "train"):
        by_q[r["question"]][r["answer"]] += 1
    for r in _records(vqa_world, "advqa"):
        if r["question"] in by_q:
            c = by_q[r["question"]]
            assert max(sorted(c), key=c.__getitem__) != r["answer"]


def test_far_sets(vqa_world):
    assert {r["kind"] for r in _records(vqa_world, "textvqa")} == {"read"}
    assert {r["kind"] for r in _records(vqa_world, "ok-vqa")} == {"corners"}
    viz = _records(vqa_world, "vizwiz")
    assert any(r["answer"] == "unanswerable" for r in viz)
    id_answers = {r["answer"] for r in _records(vqa_world, "vqav2", "train")}
    assert "unanswerable" not in id_answers and "12" not in id_answers


def test_vqa_quickstart_smoke(tmp_path, capsys, one_thread):
    """`grace quickstart --task vqa` end to end at smoke size: every row, its per-set accuracies and Adv."""
    import json

    from grace_app.cli import main

    out = tmp_path / "qs"
    assert main(["quickstart", "--task", "vqa", "--size", "small", "--steps", "2", "--pretrain-steps", "5",
                 "--n-adv", "2", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "| zero-shot |" in said and "| GRACE |" in said
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["zero-shot", "LoRA", "FT", "DiGraP", "GRACE"]
    for r in summary["rows"]:
        assert r["id"] is not None and r["adv"] is not None and len(r["sets"]) == 10
    assert (out / "runs" / "grace" / "eval" / "predictions" / "advqa.json").is_file()
    from grace_app.studies.publish import add_source, page_markdown

    assert add_source(out, tmp_path / "pages").name == "quickstart-vqa.json"
    other = tmp_path / "world1"  # a second VQA world's quick start is a page of its own
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(dict(summary, seed=1)))
    assert add_source(other, tmp_path / "pages").name == "quickstart-vqa-world1.json"
    assert page_markdown(dict(summary, seed=1)).startswith("# Quick start, VQA world seed 1\n")
    assert main(["quickstart", "--task", "vqa", "--seeds", "2", "--out", str(out)]) == 2


def test_calibration_checks_read_the_baselines_only():
    from grace_app.studies.quickstart_vqa import calibration

    def row(m, i, n, f, tv=40.0, lo=30.0):
        return {"method": m, "id": i, "near": n, "far": f, "sets": {"textvqa": tv, "ok-vqa": tv},
                "set_ci95": {"textvqa": [lo, 50], "ok-vqa": [lo, 50]}}

    good = calibration([row("zero-shot", 50, 50, 30), row("FT", 80, 55, 20), row("GRACE", 10, 10, 10)])
    assert [c["holds"] for c in good] == [True, True, True, True]
    assert all("GRACE" not in c["check"] for c in good)
    bad = calibration([row("zero-shot", 50, 50, 30, lo=10.0), row("LoRA", 55, 60, 40)])
    assert [c["holds"] for c in bad] == [False, False, False, False]


@pytest.mark.slow
def test_vqa_world_calibration_holds(tmp_path):
    """The full-size VQA quick start (minutes): every baseline calibration check holds (docs/vqa.md)."""
    from grace_app.studies.quickstart_vqa import VqaQuickstartConfig, run_vqa_quickstart

    res = run_vqa_quickstart(VqaQuickstartConfig(out=tmp_path / "qs", methods=["zero-shot", "LoRA", "FT"],
                                                 n_adv=0), progress=False, echo=lambda *_: None)
    import json

    checks = json.loads((tmp_path / "qs" / "summary.json").read_text())["calibration"]
    assert len(checks) == 6 and all(c["holds"] for c in checks), checks
    assert res["rows"][0]["method"] == "zero-shot"


def test_vqa_tuning_smoke(tmp_path, capsys, one_thread):
    """`grace study tune --task vqa`: trials train on vqav2 train and are scored on its val split by the engine's VQA
    suites; the page says so and is its own (the classification tuning is never touched); a classification-only
    recipe is refused before any work."""
    import json

    from grace_app.cli import main
    from grace_app.studies.publish import add_source

    out = tmp_path / "tune"
    args = ["study", "tune", "--task", "vqa", "--methods", "ft", "--size", "small", "--steps", "2", "--trials", "2",
            "--n-val-adv", "2", "--rescore-seeds", "1", "--pretrain-steps", "5", "--out", str(out), "--no-write",
            "--no-progress"]
    assert main(args) == 0
    doc = json.loads((out / "tuning.json").read_text())
    rows = doc["methods"]["ft"]["trials"]
    assert doc["task"] == "vqa" and len(rows) == 2 and doc["methods"]["ft"]["selected"] is not None
    val = json.loads((out / "data" / "vqav2" / "vqa.json").read_text())["splits"]["val"]["questions"]
    for r in rows:  # VQA accuracy (a mean of 0, .3, .6, .9, 1 per question) on the val split's questions
        assert 0 <= r["val_clean"] <= 100 and 0 <= r["val_robust"] <= 100 and r["feature_spread"] is None
        assert round(r["val_clean"] * val / 10) == pytest.approx(r["val_clean"] * val / 10, abs=1e-6)
    assert "VQA world seed 0" in (out / "tuning.md").read_text()
    assert add_source(out, tmp_path / "data").name == "tuning-vqa-small-seed0.json"
    capsys.readouterr()
    assert main([*args[:5], "flyp", *args[6:]]) == 2
    assert "--methods flyp: its recipe 'flyp' trains only classification, not vqa" in capsys.readouterr().err

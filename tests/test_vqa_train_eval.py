"""End to end on a tiny VQA set in the frames format: convert, ``grace train --task vqa``, ``grace eval --task
vqa`` (model, zero-shot CLIP, and a result file: the same question gets the same number on every path)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from grace_app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def vqa_set(tmp_path_factory):
    return toy_vqa_set(tmp_path_factory.mktemp("vqa"), (("train", 36), ("test", 12)))


def toy_vqa_set(root, sizes) -> Path:
    """A set folder in the FRAMES record layout, converted by `grace shards convert`: per image (one colour, noisy)
    two questions, its colour (8 of 10 annotators; 2 say "dark") and "is the picture red?"; ``sizes``: (split, n)."""
    rng = np.random.default_rng(0)
    out = root / "set"
    for split, n in sizes:
        imgs, records = root / f"img_{split}", []
        imgs.mkdir()
        for i in range(n):
            c = list(COLOURS)[i % 3]
            arr = np.clip(np.array(COLOURS[c]) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(arr).save(imgs / f"{i}.png")
            records.append({"question_id": f"{split}{i}a", "question": "what colour is the picture?",
                            "image": f"{i}.png", "answer": [c] * 8 + ["dark"] * 2, "answer_type": "other"})
            records.append({"question_id": f"{split}{i}b", "question": "is the picture red?", "image": f"{i}.png",
                            "answer": ["yes" if c == "red" else "no"] * 10, "answer_type": "yes/no"})
        (root / f"{split}.json").write_text(json.dumps(records))
        assert main(["shards", "convert", "--format", "frames", "--records", str(root / f"{split}.json"),
                     "--images", str(imgs), "--split", split, "--out", str(out), "--name", "toy"]) == 0
    return out


def test_train_and_eval_vqa(vqa_set, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(vqa_set),
                 "--out", str(run), "--steps", "4", "--no-progress", "--set", "data.answers_min_count=2",
                 "--set", "train.batch_size=8", "--set", "train.val_every=0"]) == 0
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["task"] == "vqa" and set(meta["classnames"]) == {"red", "blue", "green", "yes", "no", "dark"}
    capsys.readouterr()
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "vqa", "--model", str(run), "--data", f"vqav2={vqa_set}", "--ood",
                 f"ok-vqa={vqa_set}", "--out", str(ev), "--no-progress"]) == 0
    rep = json.loads((ev / "report.json").read_text())
    s = rep["sets"]["vqav2"]
    assert s["n"] == 24 and s["group"] == "id" and rep["sets"]["ok-vqa"]["group"] == "far"
    assert rep["id"]["accuracy"] == pytest.approx(s["accuracy"]) and rep["near"]["accuracy"] is None
    scores = json.loads((ev / "scores" / "vqav2.json").read_text())
    assert len(scores) == 24 and all(any(v == pytest.approx(c) for c in (0, .3, .6, .9, 1)) for v in scores.values())
    # a result file scored on the same set gives the same number
    ev2 = tmp_path / "ev2"
    assert main(["eval", "--task", "vqa", "--data", f"vqav2={vqa_set}", "--predictions",
                 str(ev / "predictions" / "vqav2.json"), "--out", str(ev2)]) == 0
    rep2 = json.loads((ev2 / "report.json").read_text())
    assert rep2["sets"]["vqav2"]["accuracy"] == s["accuracy"]
    assert json.loads((ev2 / "scores" / "vqav2.json").read_text()) == scores
    # a result file that misses a question is refused in one line
    preds = json.loads((ev / "predictions" / "vqav2.json").read_text())[1:]
    (tmp_path / "short.json").write_text(json.dumps(preds))
    assert main(["eval", "--task", "vqa", "--data", f"vqav2={vqa_set}", "--predictions",
                 str(tmp_path / "short.json"), "--out", str(tmp_path / "ev3")]) == 2
    assert "1 missing" in capsys.readouterr().err
    assert main(["eval", "--task", "vqa", "--data", f"vqav2={vqa_set}", "--predictions", str(ev / "predictions" /
                 "vqav2.json"), "--attack", "fgsm", "--out", str(tmp_path / "ev4")]) == 2
    assert "--attack needs a --model to attack, not --predictions" in capsys.readouterr().err
    assert not (tmp_path / "ev4" / "report.json").exists()
    _register_and_load_by_name(run, ev, vqa_set, tmp_path, capsys, monkeypatch)


def _register_and_load_by_name(run, ev, vqa_set, tmp_path, capsys, monkeypatch):
    """A VQA run registered under a name: its card carries the report, `grace eval --model NAME` gives the run's
    numbers, a replaced weights file is refused, a bad name or a classifier's --report is one line."""
    monkeypatch.setenv("GRACE_WEIGHTS_DIR", str(tmp_path / "weights"))
    assert main(["register", str(run), "--name", "toy-vqa-ft", "--report", str(ev / "report.json")]) == 0
    folder = tmp_path / "weights" / "vqa" / "toy-vqa-ft"
    card = json.loads((folder / "card.json").read_text())
    rep = json.loads((ev / "report.json").read_text())
    assert card["task"] == "vqa" and card["answers"] == 6 and card["steps"] == 4 and card["recipe"] == "ft"
    assert card["results"]["sets"]["vqav2"]["accuracy"] == rep["sets"]["vqav2"]["accuracy"]
    readme = (folder / "README.md").read_text()
    assert f"{rep['sets']['vqav2']['accuracy']:.2f}" in readme and "--model toy-vqa-ft" in readme
    assert not list((tmp_path / "weights" / "vqa").glob(".*"))  # written as a unit: no temporary folder left
    assert main(["list", "models", "--task", "vqa"]) == 0 and capsys.readouterr().out.split()[-1] == "toy-vqa-ft"
    by_name = tmp_path / "by-name"
    assert main(["eval", "--task", "vqa", "--model", "toy-vqa-ft", "--data", f"vqav2={vqa_set}", "--ood",
                 f"ok-vqa={vqa_set}", "--out", str(by_name), "--no-progress"]) == 0
    rep2 = json.loads((by_name / "report.json").read_text())
    assert rep2["model"] == "toy-vqa-ft (ft)" and rep2["sets"] == rep["sets"]
    assert (by_name / "predictions" / "vqav2.json").read_text() == (ev / "predictions" / "vqav2.json").read_text()
    # grace report over VQA evaluations: one row each, the groups and every set; a classification report is refused
    assert main(["report", str(ev), str(by_name), "--out", str(tmp_path / "summary")]) == 0
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == [rep["model"], "toy-vqa-ft (ft)"]
    assert summary["rows"][1]["id"] == rep["id"]["accuracy"] and summary["rows"][1]["sets"]["ok-vqa"] == \
        rep["sets"]["ok-vqa"]["accuracy"]
    assert "| method | vqav2 | ok-vqa |" in (tmp_path / "summary" / "summary.md").read_text()
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "report.json").write_text(json.dumps({"axes": {}, "model": "x"}))
    capsys.readouterr()
    assert main(["report", str(ev), str(tmp_path / "cls"), "--out", str(tmp_path / "mixed")]) == 2
    assert "a classification report among VQA ones" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["register", str(run), "--name", "../x"]) == 2
    assert "--name '../x': a VQA model name" in capsys.readouterr().err
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["eval", "--task", "vqa", "--model", "toy-vqa-ft", "--data", f"vqav2={vqa_set}", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "differs from the VQA entry toy-vqa-ft's card" in capsys.readouterr().err


def test_zero_shot_and_refusals(vqa_set, tiny_clip_dir, tmp_path, capsys):
    ev = tmp_path / "zs"
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"toy={vqa_set}",
                 "--answers-min-count", "2", "--out", str(ev), "--no-progress"]) == 0
    rep = json.loads((ev / "report.json").read_text())
    assert rep["model"].startswith("zero-shot") and rep["sets"]["toy"]["n"] == 24
    # two attacks on the engine: each attack's own number under "suites", the Adv axis their per-question worst case
    ev = tmp_path / "zs2"
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"toy={vqa_set}",
                 "--answers-min-count", "2", "--out", str(ev), "--no-progress", "--attack", "fgsm",
                 "--suite", "adv:pgd", "--n-adv", "6", "--eps", "8/255"]) == 0
    rep = json.loads((ev / "report.json").read_text())
    each = [rep["suites"][k]["accuracy"] for k in ("adv:fgsm", "adv:pgd")]
    assert rep["adversarial"]["attack"] == "worst case of fgsm, pgd" and rep["adversarial"]["n"] == 6
    assert rep["adversarial"]["accuracy"] <= min(each)
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"toy={vqa_set}",
                 "--suite", "geometry", "--out", str(tmp_path / "g")]) == 2
    assert "unknown suite 'geometry' for --task vqa" in capsys.readouterr().err
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"toy={vqa_set}", "--ood",
                 f"mystery={vqa_set}", "--out", str(tmp_path / "x")]) == 2
    assert "--ood mystery: its group (near or far) is unknown" in capsys.readouterr().err
    # an OOD set named as the ID set is refused (it would be scored as the ID set under its name)
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"ok-vqa={vqa_set}", "--ood",
                 f"ok-vqa={vqa_set}", "--answers-min-count", "2", "--out", str(tmp_path / "twice")]) == 2
    assert "set name 'ok-vqa' given twice" in capsys.readouterr().err
    other = tmp_path / "ok-vqa"  # a folder whose name is another --ood set's name
    other.symlink_to(vqa_set, target_is_directory=True)
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"toy={vqa_set}", "--ood",
                 f"ok-vqa={vqa_set}", "--ood", str(other), "--answers-min-count", "2", "--out",
                 str(tmp_path / "twice2")]) == 2
    assert "set name 'ok-vqa' given twice" in capsys.readouterr().err
    assert main(["train", "--task", "vqa", "--recipe", "flyp", "--init", str(tiny_clip_dir), "--data",
                 str(vqa_set), "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    assert "recipe 'flyp' trains only classification" in capsys.readouterr().err


def test_two_processes_equal_one(vqa_set, tiny_clip_dir, tmp_path):
    """torchrun with 2 gloo ranks (1 thread each): the same report and predictions as one process."""
    from test_engine import _torchrun

    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(vqa_set),
                 "--out", str(run), "--steps", "2", "--no-progress", "--set", "data.answers_min_count=2",
                 "--set", "train.batch_size=8", "--set", "train.val_every=0"]) == 0
    args = ["--task", "vqa", "--model", str(run), "--data", f"vqav2={vqa_set}", "--batch-size", "5", "--device",
            "cpu", "--no-progress", "--attack", "fgsm", "--n-adv", "12"]
    assert main(["eval", *args, "--out", str(tmp_path / "one")]) == 0
    p = _torchrun(2, [*args, "--out", str(tmp_path / "two")])
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log[-3000:]
    for f in ("predictions/vqav2.json", "scores/vqav2.json", "report.md"):
        assert (tmp_path / "one" / f).read_text() == (tmp_path / "two" / f).read_text(), f
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert (one["config"]["world_size"], two["config"]["world_size"]) == (1, 2)

    def measured(rep):  # everything but the timings and the process count
        return {k: v for k, v in rep.items() if k not in ("seconds", "startup", "config")}

    assert measured(one) == measured(two) and one["adversarial"]["n"] == 12


def test_attack_batched_and_one_question_at_a_time(vqa_set, tiny_clip_dir, tmp_path):
    """APGD-CE against the clean answers attacks a batch as a whole; an attack that calls the model on a subset of
    the rows (here a fake one) is redone one question at a time, each with its own question bound."""
    import torch

    from eval_suites.attacks import create_attack
    from eval_suites.vqa import _attacked
    from grace_plugin.models.clip import load_clip
    from grace_plugin.vqa.model import QuestionEncoder, vqa_model_from_clip

    bundle = load_clip(tiny_clip_dir)
    model, enc = vqa_model_from_clip(bundle, ["red", "blue", "green", "yes", "no"]), QuestionEncoder(bundle)
    x = torch.rand(4, 3, 32, 32)
    ctx = enc.context(model, ["what colour?", "is it red?", "what colour is it?", "is it blue?"])
    calls = []

    def subset_attack(xb, yb):  # calls the model on the batch's first row only
        calls.append(xb.shape[0])
        return xb + 0 * model(xb[:1]).sum()

    clean, adv = _attacked(model, ctx, x, subset_attack)
    assert calls == [4, 1, 1, 1, 1] and clean == adv
    clean, adv = _attacked(model, ctx, x, create_attack("apgd-ce", model, 4 / 255))
    assert len(clean) == len(adv) == 4 and set(clean + adv) <= set(model.answers)


def test_vqa_attack_resumes_from_its_state(vqa_set, tiny_clip_dir, tmp_path, monkeypatch):
    """The VQA pixel attack keeps a resume state per finished batch, as the classification attack does: a rerun with
    the same signature attacks nothing again and returns the same rows; another signature recomputes."""
    from eval_suites import vqa
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.models.clip import load_clip
    from grace_plugin.vqa.model import QuestionEncoder, vqa_model_from_clip

    bundle = load_clip(tiny_clip_dir)
    model, enc = vqa_model_from_clip(bundle, ["red", "blue", "green", "yes", "no"]), QuestionEncoder(bundle)
    urls, state = open_shard_set(vqa_set, split="test").urls, tmp_path / "state" / "vqa-adv-fgsm.json"
    first = vqa.attack_set(model, enc, urls, "fgsm", 4 / 255, 10, "cpu", batch_size=4, state_path=state,
                           signature={"w": 1})
    assert len(first) == 10 and list(state.parent.glob("vqa-adv-fgsm.rank0.json"))
    calls = []
    real = vqa._attacked
    monkeypatch.setattr(vqa, "_attacked", lambda *a: calls.append(1) or real(*a))
    again = vqa.attack_set(model, enc, urls, "fgsm", 4 / 255, 10, "cpu", batch_size=4, state_path=state,
                           signature={"w": 1})
    assert again == first and calls == []  # all three batches read back
    vqa.attack_set(model, enc, urls, "fgsm", 4 / 255, 10, "cpu", batch_size=4, state_path=state, signature={"w": 2})
    assert len(calls) == 3  # another model: recomputed, never the old numbers


def test_a_vqa_run_is_refused_where_a_classifier_is_expected(vqa_set, tiny_clip_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--task", "vqa", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(vqa_set),
                 "--out", str(run), "--steps", "1", "--no-progress", "--set", "data.answers_min_count=2",
                 "--set", "train.batch_size=8", "--set", "train.val_every=0"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--data", str(vqa_set), "--out", str(tmp_path / "e")]) == 2
    assert "a vqa run; evaluate it with grace eval --task vqa" in capsys.readouterr().err
    monkeypatch.setenv("GRACE_WEIGHTS_DIR", str(tmp_path / "weights"))  # register: a VQA entry, not a timm name
    assert main(["register", str(run), "--name", "X_VQA"]) == 0
    assert (tmp_path / "weights" / "vqa" / "X_VQA" / "card.json").is_file()
    assert not (tmp_path / "weights" / "X_VQA").exists()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "open_clip", "--out", str(tmp_path / "x")]) == 2
    assert "names and export publish image classifiers" in capsys.readouterr().err
    assert main(["eval", "--data", str(vqa_set), "--out", str(tmp_path / "e2")]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_vqa_run_killed_and_resumed_is_bit_identical(vqa_set, tiny_clip_dir, tmp_path, killed_trainer):
    """The trainer's resume serves VQA unchanged: killed after step 2 and resumed, the weights equal an unbroken
    run's byte for byte (the binder holds no state beyond a cache)."""
    base = ["train", "--task", "vqa", "--recipe", "grace", "--init", str(tiny_clip_dir), "--data", str(vqa_set),
            "--steps", "4", "--no-progress", "--set", "data.answers_min_count=2", "--set", "train.batch_size=8",
            "--set", "train.val_every=0", "--set", "train.ckpt_every=1", "--set", "recipe.lora_rank=4",
            "--set", "recipe.pgd_steps=1"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    with killed_trainer(2), pytest.raises(KeyboardInterrupt):
        main([*base, "--out", str(tmp_path / "broken")])
    assert main([*base, "--out", str(tmp_path / "broken"), "--resume"]) == 0
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "broken" / "model.safetensors").read_bytes() == whole


def test_several_attacks_give_the_worst_case_per_question():
    """The Adv axis over several attacks is, per question, the lowest score (all on the same first questions)."""
    from eval_suites.vqa import _worst_case

    a = [{"question_id": 1, "score": 1.0, "answer": "x"}, {"question_id": 2, "score": 0.3, "answer": "y"}]
    b = [{"question_id": 1, "score": 0.6, "answer": "z"}, {"question_id": 2, "score": 1.0, "answer": "w"}]
    assert [r["answer"] for r in _worst_case({"a": a, "b": b})] == ["z", "y"]
    assert _worst_case({"a": a}) is a
    with pytest.raises(AssertionError, match="different questions"):
        _worst_case({"a": a, "b": b[::-1]})

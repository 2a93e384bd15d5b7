"""Image classification recast as VQA (DiGraP §4.2): the conversion keeps every image and label, exact match equals
the VQA accuracy of ten identical answers, and ClipMatch is the nearest class by an independent computation."""
import json

import pytest
import torch

from grace_app.cli import main
from grace_plugin.data.shards import open_shard_set
from grace_plugin.vqa.accuracy import normalize_prediction
from grace_plugin.vqa.classification import QUESTION, clip_match, simple_text
from grace_plugin.vqa.data import read_records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recast(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("recast") / "id-as-vqa"
    assert main(["shards", "convert", "--format", "classification", "--source-set", str(tiny_world / "id"),
                 "--split", "test", "--out", str(out)]) == 0
    return out


def test_conversion_keeps_every_image_and_label(recast, tiny_world):
    src = open_shard_set(tiny_world / "id", split="test")
    recs = read_records(open_shard_set(recast).urls)
    info = json.loads((recast / "vqa.json").read_text())
    assert info["classification"]["classes"] == src.classnames
    from grace_plugin.data.shards import label_counts

    counts = label_counts(src.urls)
    assert len(recs) == sum(counts.values())
    for r in recs:
        assert r["question"] == QUESTION and r["answers"] == [normalize_prediction(src.classnames[r["label"]])] * 10
    assert {r["label"]: 0 for r in recs}.keys() == counts.keys()


def test_simple_text():
    assert simple_text("  Great-White   SHARK! ") == "great white shark"


def test_clip_match_is_the_nearest_class(tiny_bundle):
    classes, templates = ["circle", "square", "triangle"], ["a photo of a {c}.", "a drawing of a {c}."]
    answers = ["a circle", "square", "the triangle thing"]
    top = clip_match(answers, tiny_bundle, classes, templates, k=2)
    tok = tiny_bundle.tokenizer()
    with torch.no_grad():
        w = torch.stack([torch.nn.functional.normalize(
            tiny_bundle.clip.encode_text(tok([t.format(c=c) for t in templates]), normalize=True).mean(0), dim=0)
            for c in classes])
        a = tiny_bundle.clip.encode_text(tok(answers), normalize=True)
    assert torch.equal(top, (a @ w.t()).topk(2, dim=1).indices)


def test_eval_reports_exact_match_and_clipmatch(recast, tiny_clip_dir, tmp_path, capsys):
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "vqa", "--model", str(tiny_clip_dir), "--data", f"cls={recast}",
                 "--answers-min-count", "1", "--out", str(ev), "--no-progress"]) == 0
    assert "Classification recast as VQA" in capsys.readouterr().out
    s = json.loads((ev / "report.json").read_text())["sets"]["cls"]
    c = s["classification"]
    assert c["n"] == s["n"] and c["exact_match"] == pytest.approx(s["accuracy"])
    assert c["clip_match_1"] <= c["clip_match_5"]

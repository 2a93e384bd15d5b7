"""``grace shards convert --format frames|coco-vqa``: tiny files in each real layout round-trip into the vqa shard
layout; bad input is one line (exit 2); a question whose image is missing is skipped, counted and listed."""
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from grace_app.cli import main
from grace_plugin.data.loader import make_eval_loader
from grace_plugin.data.shards import detect_layout, open_shard_set
from grace_plugin.data.transforms import eval_transform
from grace_plugin.vqa.data import VqaTarget, answer_vocabulary, read_records


def _images(root, names):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        arr = (rng.uniform(size=(10, 10, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(root / n, format="JPEG" if n.endswith(".jpg") else "PNG")
    return root


@pytest.fixture()
def frames_set(tmp_path):
    imgs = _images(tmp_path / "images", ["a.jpg", "sub/b.png".replace("sub/", ""), "c.png"])
    records = [
        {"question_id": 11, "question": "How many dogs?", "image": "a.jpg", "answer": ["2"] * 7 + ["3"] * 3},
        {"question_id": "12", "question": "What colour?", "image": "b.png", "answer": ["red"] * 10,
         "question_type": "what color", "answer_type": "other"},
        {"question_id": 13, "question": "Is it raining?", "image": "a.jpg", "answer": "no"},
        {"question_id": 14, "question": "Any cats?", "image": "missing.png", "answer": ["no"] * 10},
    ]
    (tmp_path / "recs.json").write_text(json.dumps(records))
    return tmp_path, imgs, records


def test_frames_round_trip(frames_set, capsys):
    tmp, imgs, records = frames_set
    out = tmp / "set"
    assert main(["shards", "convert", "--format", "frames", "--records", str(tmp / "recs.json"), "--images",
                 str(imgs), "--split", "val", "--out", str(out), "--group", "near", "--maxcount", "2"]) == 0
    said = capsys.readouterr().out
    assert "3 questions in 2 shards" in said and "image_missing: 1" in said
    assert detect_layout(out).name == "vqa"
    s = open_shard_set(out)
    assert s.layout == "vqa" and s.split == "val" and s.meta["info"]["group"] == "near"
    assert json.loads((out / "val" / "skipped.json").read_text()) == {"image_missing": [14]}
    info = json.loads((out / "vqa.json").read_text())
    assert info["splits"]["val"]["questions"] == 3 and info["splits"]["val"]["skipped"] == {"image_missing": 1}
    got = read_records(s.urls)
    assert [r["question_id"] for r in got] == [11, "12", 13]
    assert got[2]["answers"] == ["no"] and got[1]["question_type"] == "what color"
    assert got[0]["answers"] == records[0]["answer"]
    # image bytes are copied as they are
    blobs = []
    for u in s.urls:
        with tarfile.open(u) as tf:
            blobs += [tf.extractfile(m).read() for m in tf if not m.name.endswith(".json")]
    assert blobs == [(imgs / "a.jpg").read_bytes(), (imgs / "b.png").read_bytes(), (imgs / "a.jpg").read_bytes()]
    # decoded through the loaders with the VQA target
    vocab = answer_vocabulary(got, min_count=1)
    assert vocab == ["red", "2", "3", "no"]  # most frequent first
    batches = list(make_eval_loader(s.urls, eval_transform({"input_size": (3, 10, 10)}), 8,
                                    target=VqaTarget(vocab)))
    qs = [q for b in batches for q in b["question"]]
    assert qs == ["How many dogs?", "What colour?", "Is it raining?"]
    assert sum(b["label"].shape[0] for b in batches) == 3 and batches[0]["label"].shape[1] == 4


def test_frames_strict_refuses_a_missing_image(frames_set, capsys):
    tmp, imgs, _ = frames_set
    assert main(["shards", "convert", "--format", "frames", "--records", str(tmp / "recs.json"), "--images",
                 str(imgs), "--out", str(tmp / "s"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "question_id 14: image_missing (missing.png); --strict" in err[0]


@pytest.mark.parametrize("bad,needle", [
    ([{"question": "q", "image": "a.jpg", "answer": ["x"]}], "record 0: field 'question_id'"),
    ([{"question_id": 1, "question": "", "image": "a.jpg", "answer": ["x"]}], "record 0: field 'question'"),
    ([{"question_id": 1, "question": "q", "image": "a.jpg"}], "record 0: field 'answer'"),
    ([{"question_id": 1, "question": "q", "image": "a.jpg", "answer": [3]}], "record 0: the annotators' answers"),
    ({"x": 1}, "record 0: expected an object"),
    ([{"question_id": 1, "question": "q", "image": "a.jpg", "answer": "x"},
      {"question_id": 1, "question": "q", "image": "a.jpg", "answer": "x"}], "question ids repeat"),
])
def test_frames_bad_records_are_one_line(frames_set, bad, needle, capsys):
    tmp, imgs, _ = frames_set
    (tmp / "bad.json").write_text(json.dumps(bad))
    assert main(["shards", "convert", "--format", "frames", "--records", str(tmp / "bad.json"), "--images",
                 str(imgs), "--out", str(tmp / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.fixture()
def coco_set(tmp_path):
    imgs = _images(tmp_path / "val2014", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"])
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
          "questions": [{"question_id": 420, "image_id": 42, "question": "What is it?"},
                        {"question_id": 70, "image_id": 7, "question": "How many?"}]}
    anns = {"annotations": [
        {"question_id": 70, "image_id": 7, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i}
                                                    for i in range(1, 11)]},
        {"question_id": 420, "image_id": 42, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "dog", "answers": [{"answer": a, "answer_id": i} for i, a in
                                                      enumerate(["dog"] * 6 + ["puppy"] * 4, 1)]}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    return tmp_path, imgs, qs, anns


def _coco_args(tmp, imgs, out, pattern="COCO_val2014_{image_id:012d}.jpg"):
    return ["shards", "convert", "--format", "coco-vqa", "--questions", str(tmp / "q.json"), "--annotations",
            str(tmp / "a.json"), "--images", str(imgs), "--image-pattern", pattern, "--split", "val", "--out",
            str(out)]


def test_coco_vqa_round_trip(coco_set, capsys):
    tmp, imgs, qs, anns = coco_set
    assert main(_coco_args(tmp, imgs, tmp / "set")) == 0
    assert "2 questions in 1 shards" in capsys.readouterr().out
    got = read_records(open_shard_set(tmp / "set").urls)
    assert [r["question_id"] for r in got] == [420, 70]
    assert got[0]["answers"] == ["dog"] * 6 + ["puppy"] * 4 and got[0]["image_id"] == 42
    assert got[1]["question_type"] == "how many" and got[1]["answer_type"] == "number"
    assert got[0]["image"] == "COCO_val2014_000000000042.jpg"


def test_coco_vqa_bad_input_is_one_line(coco_set, capsys):
    tmp, imgs, qs, anns = coco_set
    assert main(_coco_args(tmp, imgs, tmp / "s", pattern="{img}.jpg")) == 2
    assert "--image-pattern '{img}.jpg'" in capsys.readouterr().err
    anns["annotations"].pop()
    (tmp / "a.json").write_text(json.dumps(anns))
    assert main(_coco_args(tmp, imgs, tmp / "s")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no annotation for question_id 420" in err[0] and "1 questions lack one" in err[0]
    (tmp / "a.json").write_text("{")
    assert main(_coco_args(tmp, imgs, tmp / "s")) == 2
    assert "a.json" in capsys.readouterr().err
    assert main(["shards", "convert", "--format", "coco-vqa", "--questions", str(tmp / "q.json"), "--images",
                 str(imgs), "--out", str(tmp / "s")]) == 2
    assert "--format coco-vqa needs --annotations, --image-pattern" in capsys.readouterr().err

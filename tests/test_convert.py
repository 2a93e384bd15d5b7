import json

import numpy as np
import pytest
from PIL import Image

from grace_app.cli import main
from grace_plugin.data.loader import make_eval_loader
from grace_plugin.data.shards import detect_layout, get_layout, list_layouts, open_shard_set
from grace_plugin.data.transforms import eval_transform


@pytest.fixture()
def imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(5 + c):
            arr = (rng.uniform(size=(12, 12, 3)) * 255).astype("uint8")
            fmt, ext = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")][i % 3]
            Image.fromarray(arr).save(root / f"class{c}" / f"img{i}{ext}", format=fmt)
    return root


def test_layouts_are_a_registry():
    assert {"clip_benchmark", "timm"} <= set(list_layouts())


@pytest.mark.parametrize("layout", [n for n in list_layouts() if not get_layout(n).from_imagefolder])
def test_layouts_not_from_imagefolder_are_refused(imagefolder, tmp_path, layout, capsys):
    assert main(["shards", "convert", "--imagefolder", str(imagefolder), "--out", str(tmp_path / "o"), "--layout",
                 layout]) == 2
    assert f"--layout {layout}: not written from an ImageFolder tree" in capsys.readouterr().err


@pytest.mark.parametrize("layout", [n for n in list_layouts() if get_layout(n).from_imagefolder])
def test_convert_roundtrip_counts_and_labels(imagefolder, tmp_path, layout, capsys):
    """Every registered layout: its converter writes the ImageFolder, the folder is recognised as that layout, and
    its reader gives back every image byte for byte with its label."""
    out = tmp_path / layout
    assert main(["shards", "convert", "--imagefolder", str(imagefolder), "--out", str(out), "--layout", layout,
                 "--maxcount", "4", "--workers", "2"]) == 0
    assert "18 samples from 3 classes in 5 shards" in capsys.readouterr().out
    assert detect_layout(out).name == layout
    s = open_shard_set(out)
    assert s.layout == layout and s.classnames == ["class0", "class1", "class2"] and len(s.urls) == 5
    labels = [int(y) for b in make_eval_loader(s.urls, eval_transform({"input_size": (3, 12, 12)}), 7, 3)
              for y in b["label"]]
    assert sorted(labels) == [0] * 5 + [1] * 6 + [2] * 7
    # image bytes are copied as they are: every source file appears byte for byte, once, with its folder's label
    import tarfile

    members = {}
    for url in s.urls:
        with tarfile.open(url) as tf:
            for m in tf:
                members[m.name] = tf.extractfile(m).read()
    images = {k: v for k, v in members.items() if not k.endswith((".cls", ".json"))}
    sources = sorted(imagefolder.glob("*/*"))
    assert sorted(images.values()) == sorted(f.read_bytes() for f in sources)
    by_bytes = {f.read_bytes(): int(f.parent.name[-1]) for f in sources}
    assert all(int(members[k.rsplit(".", 1)[0] + ".cls"]) == by_bytes[v] for k, v in images.items())
    if layout == "timm":
        info = json.loads((out / "_info.json").read_text())
        assert info["splits"]["validation"]["shard_lengths"] == [4, 4, 4, 4, 2] and s.expected == 18


def test_convert_resumes_and_repairs(imagefolder, tmp_path):
    from grace_plugin.data.convert import convert_imagefolder

    out = tmp_path / "cb"
    convert_imagefolder(imagefolder, out, maxcount=4, workers=1)
    (out / "test" / "1.tar").write_bytes(b"garbage")  # a broken shard from an interrupted run
    (out / "test" / "3.tar").unlink()
    r = convert_imagefolder(imagefolder, out, maxcount=4, workers=1)
    assert r.skipped_existing == 3 and r.samples == 18


def test_convert_bad_input(tmp_path, capsys, imagefolder):
    assert main(["shards", "convert", "--imagefolder", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "ImageFolder root does not exist" in capsys.readouterr().err
    assert main(["shards", "convert", "--imagefolder", str(imagefolder), "--out", str(tmp_path / "o"),
                 "--layout", "tfrecord"]) == 2
    err = capsys.readouterr().err
    assert "unknown layout 'tfrecord'" in err and "clip_benchmark" in err and len(err.strip().splitlines()) == 1

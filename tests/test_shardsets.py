"""Both public layouts, URL specs, the catalogue and class-subset scoring."""
import io
import json
import shutil
import tarfile

import pytest
import torch

from eval_suites.evaluate import evaluate_clean
from eval_suites.shardsets import get_shardset, list_shardsets, match_class_subset
from grace_plugin.data.loader import make_eval_loader
from grace_plugin.data.shards import ShardSetError, count_samples, open_shard_set
from grace_plugin.data.transforms import eval_transform


def _timm_layout(src_set, dst, name="imagenet1k"):
    """Re-pack a CLIP_benchmark split as timm's layout: _info.json + <name>-validation-NNNN.tar (jpg, cls, json)."""
    src = open_shard_set(src_set)
    dst.mkdir(parents=True)
    files, lengths = [], []
    for i, url in enumerate(src.urls):
        fn = f"{name}-validation-{i:04d}.tar"
        n = 0
        with tarfile.open(url) as tin, tarfile.open(dst / fn, "w") as tout:
            for m in tin:
                data = tin.extractfile(m).read()
                key, ext = m.name.split(".", 1)
                ext = "jpg" if ext in ("png", "webp", "jpeg") else ext
                n += ext == "cls"
                for e, d in ((ext, data),) + ((("json", json.dumps({"key": key}).encode()),) if ext == "cls" else ()):
                    ti = tarfile.TarInfo(f"{key}.{e}")
                    ti.size = len(d)
                    tout.addfile(ti, io.BytesIO(d))
        files.append(fn)
        lengths.append(n)
    info = {"name": name, "splits": {"validation": {"name": "validation", "num_samples": sum(lengths),
                                                    "filenames": files, "shard_lengths": lengths}}}
    (dst / "_info.json").write_text(json.dumps(info))
    shutil.copy(src.root / "classnames.txt", dst / "classnames.txt")
    return sum(lengths)


def test_timm_layout_reads_as_is(tiny_world, tmp_path):
    n = _timm_layout(tiny_world / "v2", tmp_path / "timm")
    s = open_shard_set(tmp_path / "timm", split="test")  # "test" reads as "validation"
    assert s.layout == "timm" and s.split == "validation" and s.expected == n == count_samples(s.urls)
    labels = [int(x) for b in make_eval_loader(s.urls, eval_transform({"input_size": (3, 32, 32)}), 16, 10)
              for x in b["label"]]
    ref = [int(x) for b in make_eval_loader(open_shard_set(tiny_world / "v2").urls,
                                            eval_transform({"input_size": (3, 32, 32)}), 16, 10) for x in b["label"]]
    assert labels == ref


def test_timm_layout_bad_info(tmp_path):
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"validation": {"filenames": ["x.tar"],
                                                                             "num_samples": 3}}}))
    with pytest.raises(ShardSetError, match="missing"):
        open_shard_set(tmp_path)
    (tmp_path / "_info.json").write_text("{nope")
    with pytest.raises(ShardSetError, match="_info.json: not valid JSON"):
        open_shard_set(tmp_path)


def test_imagenet_names_ship_for_layouts_without_them(tiny_world, tmp_path):
    _timm_layout(tiny_world / "v2", tmp_path / "imagenet-1k-wds")
    (tmp_path / "imagenet-1k-wds" / "classnames.txt").unlink()
    s = open_shard_set(tmp_path / "imagenet-1k-wds")
    assert len(s.classnames) == 1000 and s.classnames[0] == "tench" and len(s.templates) == 80
    assert all("{c}" in t for t in s.templates)


def test_brace_pattern_and_pipe_urls(tiny_world):
    d = tiny_world / "sketch" / "test"
    n = int((d / "nshards.txt").read_text())
    pattern = open_shard_set(f"{d}/{{0..{n - 1}}}.tar|60")
    assert pattern.urls == [str(d / f"{i}.tar") for i in range(n)] and pattern.expected == 60
    assert pattern.classnames == open_shard_set(tiny_world / "sketch").classnames  # found one level up
    piped = open_shard_set(f"pipe:cat {d}/{{0..{n - 1}}}.tar")
    tf = eval_transform({"input_size": (3, 32, 32)})
    a = sum(b["label"].numel() for b in make_eval_loader(pattern.urls, tf, 16, 10))
    b = sum(b["label"].numel() for b in make_eval_loader(piped.urls, tf, 16, 10))
    assert a == b == 60
    with pytest.raises(ShardSetError, match="do not exist"):
        open_shard_set(f"{d}/{{0..{n + 3}}}.tar")


def test_match_class_subset_monotone():
    full = ["a", "crane", "b", "crane", "c"]
    assert match_class_subset(["crane", "crane", "c"], full) == [1, 3, 4]
    with pytest.raises(ValueError, match="not among"):
        match_class_subset(["zzz"], full)
    with pytest.raises(ValueError, match="ascending"):
        match_class_subset(["c", "a"], full)


def test_subset_through_full_head_equals_small_head(tiny_classifier, tiny_world):
    """A k-class subset scored through the full head equals a k-way head built from the same rows."""
    from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead

    subset = [1, 4, 6, 9]
    small = ClipClassifier(tiny_classifier.visual, ZeroShotHead(tiny_classifier.head.weight[subset],
                                                                float(tiny_classifier.head.logit_scale)),
                           tiny_classifier.pretrained_cfg).eval()
    s = open_shard_set(tiny_world / "sketch")
    tf = eval_transform(tiny_classifier.pretrained_cfg)
    full_logits, small_logits = [], []
    for b in make_eval_loader(s.urls, tf, 32, 10):
        with torch.no_grad():
            full_logits.append(tiny_classifier(b["image"])[:, subset])
            small_logits.append(small(b["image"]))
    assert torch.allclose(torch.cat(full_logits), torch.cat(small_logits), atol=1e-5)

    # and through evaluate_clean with relabelled samples: keep only subset classes, label = position in subset
    def relabel(loader):
        for b in loader:
            keep = torch.isin(b["label"], torch.tensor(subset))
            yield {"image": b["image"][keep], "label": torch.tensor([subset.index(int(y)) for y in b["label"][keep]],
                                                                    dtype=torch.long), "skipped": {}}

    r1 = evaluate_clean(tiny_classifier, relabel(make_eval_loader(s.urls, tf, 32, 10)), class_subset=subset)
    r2 = evaluate_clean(small, relabel(make_eval_loader(s.urls, tf, 32, 10)))
    assert (r1.correct, r1.n) == (r2.correct, r2.n) and r1.n == 24


def test_label_targets_mapping(tiny_classifier, tiny_world):
    """Mapping scoring with one-to-one targets equals plain scoring."""
    s = open_shard_set(tiny_world / "v2")
    tf = eval_transform(tiny_classifier.pretrained_cfg)
    plain = evaluate_clean(tiny_classifier, make_eval_loader(s.urls, tf, 32, 10))
    mapped = evaluate_clean(tiny_classifier, make_eval_loader(s.urls, tf, 32, 10),
                            label_targets={i: [i] for i in range(10)})
    assert (plain.correct, plain.n) == (mapped.correct, mapped.n)


@pytest.mark.parametrize("name", list_shardsets())
def test_catalogue_entries_are_well_formed(name):
    e = get_shardset(name)
    assert e.folder and e.scoring in ("own", "subset", "mapping") and e.axis in ("id", "ood", "natural_adv")
    assert e.source


def test_clean_evaluation_reports_the_feature_spread(tiny_classifier, tiny_world):
    """evaluate_clean's feature spread, summed over batches, equals the spread of every image's feature at once."""
    import torch

    from grace_plugin.losses import feature_spread

    s = open_shard_set(tiny_world / "v2")
    tf = eval_transform(tiny_classifier.pretrained_cfg)
    res = evaluate_clean(tiny_classifier, make_eval_loader(s.urls, tf, 7, 10))
    with torch.no_grad():
        feats = torch.cat([tiny_classifier.encode(b["image"]) for b in make_eval_loader(s.urls, tf, 64, 10)])
    assert feats.shape[0] == res.n
    assert res.feature_spread == pytest.approx(feature_spread(feats), abs=1e-6)
    assert res.as_dict()["feature_spread"] == res.feature_spread


@pytest.mark.parametrize("counts,classes,refused,corrupt", [
    ({0: 50, 1: 50, 2: 50}, 3, {}, {}),  # every label inside the list
    ({0: 50, 1: 50, 2: 1}, 2, {}, {2: 1}),  # one corrupt label: a bad sample
    ({0: 50, 1: 50, 7: 1, -3: 1}, 2, {}, {-3: 1, 7: 1}),
    ({0: 50, 1: 50, 2: 50}, 2, {2: 50}, {}),  # a class the list lacks: a bad set
    ({0: 10, 1: 10, 2: 7, 9: 1}, 2, {2: 7}, {9: 1}),  # half an average class: ceil(28 / 2 / 2) = 7 samples
    ({0: 10, 1: 10, 2: 6, 9: 1}, 2, {}, {2: 6, 9: 1}),  # ceil(27 / 2 / 2) = 7: 6 samples are below it
])
def test_labels_beyond_tells_a_short_class_list_from_corrupt_labels(counts, classes, refused, corrupt):
    from grace_plugin.data.shards import labels_beyond

    assert labels_beyond(counts, classes) == (refused, corrupt)


def test_label_counts_reads_the_cls_members(tiny_world):
    from grace_plugin.data.shards import label_counts

    s = open_shard_set(tiny_world / "id")
    counts = label_counts(s.urls)
    assert sorted(counts) == list(range(len(s.classnames))) and sum(counts.values()) == count_samples(s.urls)

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grace_plugin.data.loader import make_eval_loader, make_train_loader
from grace_plugin.data.shards import ShardSetError, count_samples, open_shard_set
from grace_app.testbed.world import CLASSNAMES, SyntheticWorldSpec, write_synthetic_world

IDENT = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_world_layout_and_determinism(tmp_path):
    spec = SyntheticWorldSpec(train_per_class=3, test_per_class=2, ood_per_class=2, pairs=20, shard_size=8)
    a = write_synthetic_world(tmp_path / "a", seed=3, spec=spec, workers=2)
    b = write_synthetic_world(tmp_path / "b", seed=3, spec=spec, workers=1)
    write_synthetic_world(tmp_path / "c", seed=4, spec=spec, workers=1)
    # byte-identical for one seed, whether the splits were written in parallel processes or in this one
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") and a == b
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    for name in ("id", "v2", "sketch", "rendition", "a"):
        s = open_shard_set(tmp_path / "a" / name)
        assert s.classnames == CLASSNAMES and s.templates and all("{c}" in t for t in s.templates)
        assert (tmp_path / "a" / name / "test" / "nshards.txt").read_text().strip() == str(len(s.urls))
        assert count_samples(s.urls) == a["counts"][name]["test"] == 2 * len(CLASSNAMES)
    assert a["counts"]["id"]["train"] == 30
    with tarfile.open(tmp_path / "a" / "pairs" / "train" / "0.tar") as tf:
        exts = {m.name.rsplit(".", 1)[1] for m in tf}
    assert exts == {"webp", "cls", "txt"}


def test_eval_loader_sees_every_sample_once(tiny_world):
    s = open_shard_set(tiny_world / "id")
    keys = []
    for b in make_eval_loader(s.urls, IDENT, 7, 10):
        keys += b["label"].tolist()
        assert b["image"].min() >= 0 and b["image"].max() <= 1
    assert len(keys) == count_samples(s.urls) == 80
    # labels are balanced in the synthetic world: 8 per class
    assert sorted(np.bincount(keys).tolist()) == [8] * 10


def _png(color=(10, 20, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _faulty_set(root: Path) -> Path:
    split = root / "test"
    split.mkdir(parents=True)
    with tarfile.open(split / "0.tar", "w") as tf:
        for i in range(5):  # 5 good
            _add(tf, f"g{i}.png", _png())
            _add(tf, f"g{i}.cls", b"1")
        _add(tf, "bad0.png", b"not an image at all")  # decode_error
        _add(tf, "bad0.cls", b"2")
        _add(tf, "bad1.png", _png())  # missing_label
        _add(tf, "bad2.cls", b"3")  # missing_image
        _add(tf, "bad3.png", _png())  # bad_label
        _add(tf, "bad3.cls", b"three")
        _add(tf, "bad4.png", _png())  # label_out_of_range
        _add(tf, "bad4.cls", b"12")
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tf:
        for i in range(4):
            _add(tf, f"t{i}.png", _png())
            _add(tf, f"t{i}.cls", b"0")
    data = good.getvalue()
    # cut inside the header of t2.cls: t0, t1 complete, t2 without its label (each member is 512 header + 512 data)
    (split / "1.tar").write_bytes(data[: 5 * 1024 + 100])
    (split / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    return root


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_faults_are_counted_per_reason(tmp_path, decode):
    import torchvision.transforms as T

    s = open_shard_set(_faulty_set(tmp_path / "bad"))
    n, skipped = 0, {}
    for b in make_eval_loader(s.urls, T.Compose([T.ToTensor()]), 4, num_classes=10, decode=decode):
        n += b["label"].numel()
        for k, v in b["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped.pop("tar_error") == 1
    assert skipped == {"decode_error": 1, "missing_label": 2, "missing_image": 1, "bad_label": 1,
                       "label_out_of_range": 1}
    assert n == 5 + 2  # 5 good in shard 0, t0 and t1 before the cut in shard 1


def test_train_loader_is_deterministic_and_full_batches(tiny_world):
    s = open_shard_set(tiny_world / "id", split="train")

    def first(seed, k=3):
        it = iter(make_train_loader(s.urls, IDENT, 16, 10, seed=seed, shuffle_buffer=50))
        return [next(it)["label"] for _ in range(k)]

    a, b, c = first(0), first(0), first(1)
    assert all(x.shape == (16,) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("setup,msg", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no 'test' split"),
    (lambda p: (p / "test").mkdir(parents=True), "no shards"),
    (lambda p: ((p / "test").mkdir(parents=True), (p / "test" / "nshards.txt").write_text("3")), "missing"),
])
def test_bad_folders_name_the_problem(tmp_path, setup, msg):
    p = tmp_path / "set"
    setup(p)
    with pytest.raises(ShardSetError, match=msg):
        open_shard_set(p)


def _simulate(monkeypatch, rank, world, worker, nworkers):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("WORKER", str(worker))
    monkeypatch.setenv("NUM_WORKERS", str(nworkers))


def test_eval_every_sample_once_across_2_ranks_x_2_workers(tiny_world, monkeypatch):
    """Each (rank, worker) pair reads its slice of shards; together they read every sample exactly once: the
    loaders' (image, label) outputs, fingerprinted, are pairwise disjoint and their union is the shard set as read
    independently with tarfile + PIL."""
    s = open_shard_set(tiny_world / "id", split="train")  # 5 shards: fewer than 2x2x2, uneven on purpose

    def fp(img, label):
        return hashlib.sha1(img.contiguous().numpy().tobytes()).hexdigest(), int(label)

    slices = []
    for rank in range(2):
        for worker in range(2):
            _simulate(monkeypatch, rank, 2, worker, 2)
            slices.append([fp(x, y) for b in make_eval_loader(s.urls, IDENT, 16, 10)
                           for x, y in zip(b["image"], b["label"])])
    expected, labels = [], {}
    for url in s.urls:
        with tarfile.open(url) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext == "cls":
                labels[(url, key)] = int(data)
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext in ("jpg", "jpeg", "png", "webp"):
                expected.append(fp(IDENT(Image.open(io.BytesIO(data)).convert("RGB")), labels[(url, key)]))
    assert len(expected) == count_samples(s.urls) == 240
    assert sorted(f for sl in slices for f in sl) == sorted(expected)
    for i in range(len(slices)):
        for j in range(i + 1, len(slices)):
            assert not set(slices[i]) & set(slices[j]), (i, j)
    assert all(slices), "every (rank, worker) reads something"


def test_train_equal_batches_per_rank(tiny_world, monkeypatch):
    """With a fixed epoch length every rank yields the same number of full batches, even with few shards."""
    s = open_shard_set(tiny_world / "id", split="train")
    counts, firsts = [], []
    for rank in range(2):
        _simulate(monkeypatch, rank, 2, 0, 1)
        loader = make_train_loader(s.urls[:1], IDENT, 8, 10, seed=0, shuffle_buffer=20, batches_per_epoch=6)
        batches = list(loader)
        counts.append(len(batches))
        assert all(b["label"].shape == (8,) for b in batches)
        firsts.append(batches[0]["label"])
        loader.dataset.set_epoch(1)
        assert not torch.equal(next(iter(loader))["label"], batches[0]["label"])  # epochs re-seed the stream
    assert counts == [6, 6]
    assert not torch.equal(firsts[0], firsts[1])  # ranks draw different data


def _photo(w: int, h: int, fmt: str) -> bytes:
    rng = np.random.default_rng(w * h)
    base = np.kron(rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    img = np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("size,crop_pct", [(32, 1.0), (224, 1.0), (224, 0.875)])
def test_tensor_decode_matches_the_pil_transform(size, crop_pct):
    """The tensor path (torchvision decode + timm's transform steps on uint8 tensors) agrees with timm's PIL transform
    for JPEG, PNG and WebP of several shapes (up- and down-scaling): no value more than 2 grey levels apart, 0.01
    levels on average (the two libraries round their fixed-point resampling differently). An unresized image has
    the same pixels."""
    from grace_plugin.data.decode import decode_sample
    from grace_plugin.data.transforms import as_tensor_transform, eval_transform

    cfg = {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": "bicubic",
           "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)}
    tf = eval_transform(cfg)
    tt = as_tensor_transform(tf)
    assert tt is not None
    for (w, h), fmt in [((500, 375), "JPEG"), ((37, 50), "PNG"), ((300, 301), "WEBP"), ((32, 32), "JPEG")]:
        sample = {"__key__": "k", {"JPEG": "jpg"}.get(fmt, fmt.lower()): _photo(w, h, fmt), "cls": b"1"}
        a, b = decode_sample(sample, tf)["image"], decode_sample(sample, tf, tensor_transform=tt)["image"]
        assert a.shape == b.shape == (3, size, size) and b.dtype == torch.float32
        levels = (a - b).abs() * 255
        if (w, h) == (size, size):
            assert levels.max() < 1e-3  # decoding alone: the same pixels (up to float rounding of x / 255)
        assert levels.max() <= 2 + 1e-3 and levels.mean() < 0.05, (fmt, w, h, float(levels.max()))
    for bad in (b"", b"\xff\xd8 not a jpeg"):  # empty and corrupt images are decode errors on both paths
        for kw in ({}, {"tensor_transform": tt}):
            assert decode_sample({"__key__": "k", "jpg": bad, "cls": b"1"}, tf, **kw)["__skip__"] == "decode_error"


def test_tensor_decode_falls_back_to_pil_where_the_transform_needs_it(tiny_world):
    """PIL-only transforms (timm's RandomResizedCrop, a plain function) keep the PIL path and give its images."""
    from grace_plugin.data.transforms import as_tensor_transform, train_transform

    cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}
    assert as_tensor_transform(train_transform(cfg, "rrc")) is None and as_tensor_transform(IDENT) is None
    s = open_shard_set(tiny_world / "id")
    a = next(iter(make_eval_loader(s.urls, IDENT, 8, 10, decode="pil")))
    b = next(iter(make_eval_loader(s.urls, IDENT, 8, 10, decode="tensor")))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    with pytest.raises(ValueError, match="valid: pil, tensor"):
        make_eval_loader(s.urls, IDENT, 8, 10, decode="cv2")


def test_train_stream_seeds_only_the_cpu_generator(tiny_world, monkeypatch):
    """Per-sample augmentation randomness comes from the CPU generator, seeded per sample: no torch.manual_seed
    (which also seeds CUDA) on the data path, and the same seed gives the same augmented batches."""
    from grace_plugin.data.transforms import train_transform

    s = open_shard_set(tiny_world / "id", split="train")
    tf = train_transform({"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                          "mean": (0, 0, 0), "std": (1, 1, 1)}, "rrc")
    calls = []
    real = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: calls.append(seed) or real(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("cuda", seed)))

    def first(k=2):
        it = iter(make_train_loader(s.urls, tf, 8, 10, seed=3, shuffle_buffer=20, decode="tensor"))
        return [next(it)["image"] for _ in range(k)]

    a, b = first(), first()
    assert calls == []
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "I;16", "1"])
def test_png_raw_size_matches_what_the_stream_inflates_to(mode):
    """The size a PNG's IHDR promises (png_raw_size) equals what PIL's writer's zlib stream inflates to, for every
    colour type and several bit depths; png_data_complete accepts those files."""
    import io
    import struct
    import zlib

    from PIL import Image

    from grace_plugin.data.decode import check_image_header, png_data_complete, png_raw_size

    buf = io.BytesIO()
    Image.new(mode, (37, 21)).save(buf, format="PNG")
    data = buf.getvalue()
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    assert png_raw_size(*ihdr[:4], ihdr[6]) == len(zlib.decompress(idat))
    assert png_data_complete(data) and check_image_header(data) == "PNG"


def test_png_raw_size_interlaced_closed_form():
    """Adam7: an 8x8 RGB image's seven passes are 1x1, 1x1, 2x1, 2x2, 4x2, 4x4 and 8x4 pixels, each row with a
    filter byte: 4 + 4 + 7 + 14 + 26 + 52 + 100 = 207 bytes."""
    from grace_plugin.data.decode import png_raw_size

    assert png_raw_size(8, 8, 8, 2, 1) == 207
    assert png_raw_size(8, 8, 8, 2, 0) == 8 * (1 + 24)
    assert png_raw_size(1, 1, 8, 2, 1) == 4  # only the first pass has pixels

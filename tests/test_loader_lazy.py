"""The lazy tar reader (``_lazy_members``: headers only, each rank reads just its own members' bytes) gives exactly
the samples, skips and errors of webdataset's streaming reader, on every kind of damaged shard; and a rank reads
only the members of the batches it owns."""
import gzip
import io
import tarfile

import pytest

from grace_plugin.data import tars
from grace_plugin.data.loader import _owned_records
from grace_plugin.data.tars import _shard_samples, read_members


def _tar(members, fmt=tarfile.USTAR_FORMAT) -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w", format=fmt) as tf:
        for name, data in members:
            if data is None:  # a directory entry
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return b.getvalue()


def _good(prefix, n, size=700):
    return [m for i in range(n) for m in ((f"{prefix}{i:03d}.png", bytes([i % 251]) * (size + i)),
                                          (f"{prefix}{i:03d}.cls", str(i % 3).encode()))]


def _last_member(raw: bytes) -> tuple[int, int]:
    """(offset of the last member's data, its size): tarfile pads archives to 10 KiB records, so cuts are placed
    from the members, not from the end of the file."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data, last.size


GOOD = _tar(_good("a", 5))
_OFF, _SIZE = _last_member(GOOD)
_END = _OFF + _SIZE + (-_SIZE) % 512  # end of the last member's padding: the end-of-archive blocks start here
SHARDS = {
    "good": GOOD,
    "0-byte": b"",
    "empty tar": _tar([]),
    "duplicate member": _tar(_good("d", 2) + [("d9.png", b"x" * 600), ("d9.png", b"y" * 600), ("d9.cls", b"0")]
                             + _good("e", 2)),
    "interleaved members": _tar([("x.png", b"1" * 600), ("y.png", b"2" * 600), ("x.cls", b"0"), ("y.cls", b"1")]),
    "meta members and a directory": _tar([("__meta__", b"m"), ("dir", None)] + _good("f", 3)),
    "missing label": _tar(_good("g", 2) + [("g9.png", b"z" * 600)]),
    "cut inside the last member's data": GOOD[:_OFF + _SIZE // 2],
    "cut inside the last member's header": GOOD[:_OFF - 200],
    "cut inside the last member's padding": GOOD[:_OFF + _SIZE + 1] if _SIZE % 512 < 511 else GOOD[:_END - 1],
    "no end-of-archive marker": GOOD[:_END],
    "garbage after the members": GOOD[:_END] + b"\x07" * 1536,
    "gzip-compressed (streamed, not indexed)": gzip.compress(GOOD),
    "gzip-compressed, cut": gzip.compress(GOOD)[:-300],
}


def _both(path):
    item = {"url": str(path)}
    streamed = list(_shard_samples(item, lazy=False))
    lazy = [read_members(r) for r in _shard_samples(item, lazy=True)]
    return streamed, lazy


@pytest.mark.parametrize("name", list(SHARDS))
def test_lazy_reader_equals_the_streaming_reader(name, tmp_path):
    path = tmp_path / "0.tar"
    path.write_bytes(SHARDS[name])
    streamed, lazy = _both(path)
    assert lazy == streamed


def test_cases_are_not_trivial(tmp_path):
    """The damaged shards do give skips (the comparison above is not between two empty lists)."""
    reasons = {}
    for name, raw in SHARDS.items():
        path = tmp_path / f"{abs(hash(name))}.tar"
        path.write_bytes(raw)
        reasons[name] = sorted({r.get("__skip__", "ok") for r in _shard_samples({"url": str(path)})})
    assert reasons["good"] == ["ok"]
    assert "tar_error" in reasons["cut inside the last member's data"]
    assert "tar_error" in reasons["no end-of-archive marker"]
    assert "duplicate_member" in reasons["duplicate member"]
    assert reasons["0-byte"] == ["tar_error"]
    # a compressed tar is complete when its stream is (no zero-block check on compressed bytes), cut when it is not
    assert reasons["gzip-compressed (streamed, not indexed)"] == ["ok"]
    assert "tar_error" in reasons["gzip-compressed, cut"]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_reads_only_its_own_members(rank, tmp_path, monkeypatch):
    """Batches of 2 records over 2 ranks: rank r owns batches (s + k) % 2 == r, and reads exactly their members."""
    paths = []
    for s in range(2):
        p = tmp_path / f"{s}.tar"
        p.write_bytes(_tar(_good(f"s{s}", 5)))
        paths.append(p)
    reads = []
    orig = tars._Member.read

    def counted(self, f=None):
        reads.append((self.path, self.offset))
        return orig(self, f)

    monkeypatch.setattr(tars._Member, "read", counted)
    items = [{"url": str(p), "__shard__": s} for s, p in enumerate(paths)]
    got = list(_owned_records(items, batch_size=2, limit=None, ranks=(rank, 2)))
    expected_keys = [f"s{s}{i:03d}" for s in range(2) for i in range(5) if (s + i // 2) % 2 == rank]
    assert [r["__key__"] for r in got] == expected_keys
    assert len(reads) == 2 * len(expected_keys)  # an image and a label per owned sample, nothing else
    assert all(isinstance(r["png"], bytes) for r in got)


def _png(i: int) -> bytes:
    import numpy as np
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), i % 251, np.uint8)).save(b, format="PNG")
    return b.getvalue()


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[5], [3, 7], [3, 7, 1], [3, 7, 1, 4, 6]], ids=lambda s: f"{len(s)}shards")
def test_eval_stream_scores_every_sample_once_over_ranks(world, sizes, tmp_path, monkeypatch):
    """With at least as many shards as ranks each rank reads only its own shards (s % W == r; the others are never
    opened); with fewer, batches are strided over the ranks. Either way every sample is scored exactly once, in
    batches keyed (shard, k) that do not depend on W, with uneven shard sizes and no padding."""
    from grace_plugin.data import loader
    from grace_plugin.data.loader import make_eval_loader, rank_split
    from grace_plugin.data.transforms import eval_transform

    urls = []
    for s, n in enumerate(sizes):
        p = tmp_path / f"{s}.tar"
        p.write_bytes(_tar([m for i in range(n) for m in ((f"s{s}_{i:03d}.png", _png(10 * s + i)),
                                                          (f"s{s}_{i:03d}.cls", str(i % 3).encode()))]))
        urls.append(str(p))
    tf = eval_transform({"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bicubic",
                         "mean": (0, 0, 0), "std": (1, 1, 1)})
    opened = []
    real = loader.tar_samples
    monkeypatch.setattr(loader, "tar_samples", lambda items, lazy=False: (opened.append(items[0]["url"]),
                                                                           real(items, lazy=lazy))[1])
    keys, pixels = [], []
    for rank in range(world):
        opened.clear()
        for b in make_eval_loader(urls, tf, 2, num_classes=3, ranks=(rank, world)):
            keys.append(tuple(int(v) for v in b["key"]))
            pixels += [round(float(x[0, 0, 0]) * 255) for x in b["image"]]
        assert rank_split(len(urls), world) == ("shards" if len(sizes) >= world else "batches")
        if len(sizes) >= world:
            assert sorted(opened) == [u for s, u in enumerate(urls) if s % world == rank]
        else:
            assert sorted(opened) == sorted(urls)
    want = sorted((s, k) for s, n in enumerate(sizes) for k in range((n + 1) // 2))
    assert sorted(keys) == want  # each batch once, none padded
    assert sorted(pixels) == sorted(10 * s + i for s, n in enumerate(sizes) for i in range(n))

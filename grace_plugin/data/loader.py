"""WebDataset streams for training and evaluation, with faults counted inside the stream.

Every batch is a dict ``{"image": float32[B,3,H,W] in [0,1], "label": int64[B], "skipped": {reason: count}}``.
A sample that cannot be used (undecodable image, missing image or label, bad label, truncated tar) becomes a skip
record that travels down the same stream as the good samples, so the counts survive DataLoader worker processes and
reach the report. Nothing is dropped silently.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch
from PIL import Image

from ..errors import GraceError, UsageError
from .shards import IMAGE_KEYS
from .transforms import as_tensor_transform

__all__ = ["decode_sample", "make_eval_loader", "make_train_loader", "TrainStream", "index_tar", "merge_skips",
           "SKIP_REASONS"]

log = logging.getLogger(__name__)

DECODERS = ("pil", "tensor")
SKIP_REASONS = ("missing_image", "missing_label", "bad_label", "label_out_of_range", "decode_error", "tar_error",
                "duplicate_member")


def _skip(reason: str, key: str = "", url: str = "") -> dict:
    return {"__skip__": reason, "__key__": key, "__url__": url}


# Formats a shard image may hold (PIL names); others (PDF, EPS, ICO, ...) are decode errors. The tensor path hands
# the first three to torchvision and decodes the rest with PIL.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP")


def check_image_header(data: bytes) -> str | None:
    """The image format if ``data`` may be decoded, else None. Reads headers only, never pixels:

    * ``PIL.Image.open`` parses the header (format and size) without decoding;
    * width x height above ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit, about 89 Mpx) is refused
      before any decoder allocates it (PIL itself only refuses above twice the limit);
    * a PNG's chunk structure and CRCs are walked (``Image.verify``, no decompression), so a truncated or damaged
      PNG never reaches a native decoder.
    """
    import warnings

    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                limit = Image.MAX_IMAGE_PIXELS
                if fmt not in IMAGE_FORMATS or w <= 0 or h <= 0 or (limit is not None and w * h > limit):
                    return None
                if fmt == "PNG":
                    im.verify()
    except Exception:  # PIL raises many types (and bomb warnings, made errors above) for bad headers
        return None
    return fmt


def decode_sample(sample: dict, transform: Callable, num_classes: int | None = None,
                  draft_size: int | None = None, tensor_transform: Callable | None = None) -> dict:
    """Raw tar sample -> ``{"image", "label"}`` or a skip record naming the reason.

    ``draft_size``: let libjpeg decode JPEGs at a reduced scale (1/2, 1/4, 1/8) that still covers this size
    (PIL ``Image.draft``) before the transform resizes; several times faster for large photos, slightly different
    pixels from a full decode, so it is off unless asked for.
    ``tensor_transform``: decode with torchvision (libjpeg-turbo, libpng, libwebp) into a uint8 tensor and apply
    this tensor version of ``transform`` (``as_tensor_transform``) instead of PIL: about twice as fast for photos,
    within 2 grey levels of the PIL path.
    """
    key, url = sample.get("__key__", ""), sample.get("__url__", "")
    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if img_key is None:
        return _skip("missing_image", key, url)
    if "cls" not in sample:
        return _skip("missing_label", key, url)
    raw = sample["cls"]
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError, TypeError):
        return _skip("bad_label", key, url)
    if label < 0 or (num_classes is not None and label >= num_classes):
        return _skip("label_out_of_range", key, url)
    fmt = check_image_header(sample[img_key])
    if fmt is None:
        return _skip("decode_error", key, url)
    if tensor_transform is not None and not draft_size and fmt in _TORCHVISION_FORMATS:
        from torchvision.io import ImageReadMode, decode_image

        try:  # the header is sound (check_image_header); damaged pixel data still fails here
            decoded = decode_image(torch.frombuffer(bytearray(sample[img_key]), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB)
        except Exception:
            return _skip("decode_error", key, url)
        if decoded.dtype == torch.uint8:  # (16-bit PNGs fall through to PIL below)
            return {"image": tensor_transform(decoded), "label": label}
    try:
        with Image.open(io.BytesIO(sample[img_key])) as im:
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            image = transform(im.convert("RGB"))
    except Exception:  # PIL raises many types for corrupt data; all mean "undecodable"
        return _skip("decode_error", key, url)
    return {"image": image, "label": label}


_warned: set = set()


def _warn_once(url: str, reason: str, msg: str, *args) -> None:
    """A broken shard drawn again and again (resampled training) is logged once per process, then only counted."""
    if (url, reason) not in _warned:
        _warned.add((url, reason))
        log.warning(msg, *args)


_MAX_PENDING = 256  # incomplete samples waiting for a non-contiguous member (bounded memory)


def _complete(sample: dict) -> bool:
    return "cls" in sample and any(k in sample for k in IMAGE_KEYS)


class _Member:
    """A tar member's data not read yet: ``(path, offset, size)``; ``read()`` reads it (``_lazy_members``)."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size

    def read(self, f=None) -> bytes:
        """The bytes, from ``f`` (the tar, already open) or by opening ``path``."""
        if f is None:
            with open(self.path, "rb") as f:
                return self.read(f)
        f.seek(self.offset)
        return f.read(self.size)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def _plain_local_tar(url: str) -> str | None:
    """The path of ``url`` when it is a local, uncompressed file (what ``_lazy_members`` can index), else None."""
    path = _local_path(url)
    if path is None:
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return None if head.startswith(_COMPRESSED_MAGIC) else path


def _lazy_members(path: str) -> Iterator[dict]:
    """webdataset's ``tar_file_iterator`` (the same tarfile header walk, the same member filters) without reading
    any data: each ``data`` is a :class:`_Member`. A member whose data runs past the end of the file raises
    ``tarfile.ReadError`` where reading it would have, so the samples, skips and errors are the streaming reader's
    (tests/test_loader_lazy.py compares the two on the fault table's shards). Why: under ``torchrun`` each rank
    scores only its own batches; reading only their bytes keeps a rank's I/O at 1/W of the set instead of all of it."""
    import re
    import tarfile

    size = os.path.getsize(path)
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            name = info.name
            if not info.isreg() or name is None:
                continue
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or re.match(r"__[^/]*__($|/)",
                                                                                                name):
                continue  # webdataset's meta-member filters (tariterators.tar_file_iterator)
            if info.offset_data + info.size > size:
                raise tarfile.ReadError("unexpected end of data")
            yield {"fname": name, "data": _Member(path, info.offset_data, info.size)}


def _members(item: dict, lazy: bool) -> Iterator[dict]:
    from webdataset.tariterators import tar_file_iterator, url_opener

    path = _plain_local_tar(item["url"]) if lazy else None
    if path is not None:
        yield from _lazy_members(path)
        return
    for src in url_opener([dict(item)]):
        yield from tar_file_iterator(src["stream"])


def read_members(rec: dict, f=None) -> dict:
    """A record of ``_shard_samples(..., lazy=True)`` with its members' data read (from ``f``, its open tar, if
    given)."""
    return {k: (v.read(f) if isinstance(v, _Member) else v) for k, v in rec.items()}


def _shard_samples(item: dict, lazy: bool = False) -> Iterator[dict]:
    """One shard's samples, every member accounted for.

    webdataset's ``group_by_keys`` groups *consecutive* members by key. Here (a) a key whose members are not
    consecutive is merged (held, bounded, until its image and label are both seen) instead of becoming two
    half-samples and two skips; (b) a repeated member makes *that* sample a ``duplicate_member`` skip instead of
    an exception that drops the rest of the shard; (c) a tar cut inside a member still yields every complete
    sample before the cut, then one ``tar_error`` for the cut; (d) a member of a key already scored that brings
    another image or label is a ``duplicate_member`` skip (metadata-only members of it are ignored).
    ``lazy``: a local uncompressed tar's data is not read (each member is a ``_Member``; ``read_members``).
    """
    from webdataset.tariterators import base_plus_ext

    url = item["url"]
    pending: dict[str, dict] = {}
    done: set = set()
    out: list[dict] = []

    def finish(group: dict | None) -> None:
        if group is None:
            return
        key = group["__key__"]
        if group.pop("__dup__", False):
            pending.pop(key, None)
            done.add(key)
            out.append(_skip("duplicate_member", key, url))
            return
        if key in done:
            if "cls" in group or any(k in group for k in IMAGE_KEYS):
                out.append(_skip("duplicate_member", key, url))
            return
        if key in pending:
            prev = pending.pop(key)
            if set(prev) & set(group) - {"__key__", "__url__"}:
                done.add(key)
                out.append(_skip("duplicate_member", key, url))
                return
            group = {**prev, **group}
        if _complete(group):
            done.add(key)
            out.append(group)
            return
        pending[key] = group
        if len(pending) > _MAX_PENDING:  # the oldest incomplete sample is given up (decode_sample names why)
            oldest = next(iter(pending))
            done.add(oldest)
            out.append(pending.pop(oldest))

    current = None
    error = None
    try:
        for f in _members(item, lazy):
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                finish(current)
                current = {"__key__": prefix, "__url__": url}
                yield from out
                out.clear()
            if suffix in current:
                current["__dup__"] = True
            else:
                current[suffix] = f["data"]
    except Exception as e:  # tarfile.ReadError, EOFError, OSError for truncated or unreadable shards
        error = e
    if error is not None and current is not None and not _complete(current):
        key = current["__key__"]  # the sample the cut went through: it is the tar_error below
        pending.pop(key, None)
        current = None
    finish(current)
    done.update(pending)
    out.extend(pending.values())  # never completed: decode_sample counts them as missing_image/missing_label
    yield from out
    if error is not None:
        _warn_once(url, "tar", "shard %s: unreadable from here on (%s); counted as tar_error", url,
                   type(error).__name__)
        yield _skip("tar_error", "", url)
    elif _truncated_local_tar(url):
        _warn_once(url, "trunc", "shard %s: no end-of-archive marker (truncated); counted as tar_error", url)
        yield _skip("tar_error", "", url)


def _tar_samples(urls: Iterable[dict], lazy: bool = False) -> Iterator[dict]:
    """Expand shards into samples (:func:`_shard_samples`); a broken tar yields one ``tar_error`` skip."""
    for item in urls:
        yield from _shard_samples(item, lazy)


def _truncated_local_tar(url: str) -> bool:
    """Python's tarfile stops silently when a file is cut at a header; a complete tar ends with 2 zero blocks."""
    path = _plain_local_tar(url)  # a compressed tar's end is checked by its decompressor (a cut stream raises)
    if path is None:
        return False
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def _count_skip(rec: dict, skipped: Counter, logged: set) -> bool:
    """Count a skip record by its reason (logging the first of each reason); False for a usable sample."""
    reason = rec.get("__skip__")
    if reason is None:
        return False
    skipped[reason] += 1
    if reason not in logged:
        logged.add(reason)
        log.warning("skipping sample %r in %s: %s (further '%s' skips are counted, not logged)",
                    rec.get("__key__"), rec.get("__url__"), reason, reason)
    return True


def _batches(samples: Iterable[dict], batch_size: int, partial: bool = True) -> Iterator[dict]:
    images, labels, skipped = [], [], Counter()
    logged: set = set()
    pos = None
    for s in samples:
        pos = s.get("__pos__", pos)
        if _count_skip(s, skipped, logged):
            continue
        images.append(s["image"])
        labels.append(s["label"])
        if len(images) == batch_size:
            batch = {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
                     "skipped": dict(skipped)}
            if pos is not None:  # a seekable stream's position after this batch (TrainStream.seek)
                batch["cursor"] = pos
            yield batch
            images, labels, skipped = [], [], Counter()
    if (images and partial) or skipped:
        if images and not partial:
            images, labels = [], []
        yield {"image": torch.stack(images) if images else torch.empty(0),
               "label": torch.tensor(labels, dtype=torch.long), "skipped": dict(skipped)}


class NoUsableSamples(GraceError, ValueError):
    """A training stream with no usable sample in a full pass over its shards; the message names the folder."""


def merge_skips(total: Counter, batch: dict) -> None:
    for k, v in batch.get("skipped", {}).items():
        total[k] += v


def _tensor_path(transform: Callable, decode: str) -> Callable | None:
    if decode not in DECODERS:
        raise UsageError(f"unknown decode {decode!r}; valid: {', '.join(DECODERS)}")
    return as_tensor_transform(transform) if decode == "tensor" else None


def make_eval_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                     num_workers: int = 0, draft_size: int | None = None, decode: str = "pil",
                     limit: int | None = None, ranks: tuple[int, int] | None = None) -> torch.utils.data.DataLoader:
    """Every sample exactly once across ranks and workers, in shard order (batched inside the workers).

    Batches are cut by position inside each shard: batch ``(s, k)`` holds the records ``k*B .. k*B+B-1`` of shard
    ``s`` (a skipped sample keeps its position and counts in that batch's ``skipped``), so which samples share a
    batch does not depend on the number of ranks or workers. Rank ``r`` of ``W`` (torchrun's ``RANK``/``WORLD_SIZE``
    or the initialised process group) decodes only the batches with ``(s + k) % W == r``; each batch carries its
    ``"key": (s, k)``. Workers split the shards. ``limit``: only the first ``limit`` records of the stream (in shard
    order; needs ``num_workers=0``), e.g. the attacked subset. ``ranks=(0, 1)``: every batch, whatever the world.

    ``decode``: ``pil`` (default: exactly timm's and RobustBench's PIL preprocessing) or ``tensor`` (torchvision
    decoding and tensor resize, ``decode_sample``'s ``tensor_transform``; PIL where the transform needs it)."""
    import webdataset as wds

    tt = _tensor_path(transform, decode)
    if limit is not None and num_workers > 0:
        raise ValueError("make_eval_loader: limit counts records in shard order and needs num_workers=0")

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        _number_shards,
        wds.split_by_worker,
        lambda src: _owned_records(src, batch_size, limit, ranks),
        wds.map(lambda s: s if "__skip__" in s else dict(decode_sample(s, transform, num_classes, draft_size, tt),
                                                         __batch__=s["__batch__"])),
        _keyed_batches,
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers)


def _local_path(url: str) -> str | None:
    path = url[len("file://"):] if url.startswith("file://") else url
    return path if "://" not in path and not path.startswith("pipe:") and os.path.isfile(path) else None


def _number_shards(src: Iterable[dict]) -> Iterator[dict]:
    for i, item in enumerate(src):
        yield dict(item, __shard__=i)


def _owned_records(items: Iterable[dict], batch_size: int, limit: int | None,
                   ranks: tuple[int, int] | None = None) -> Iterator[dict]:
    """Tar records tagged with their batch ``(shard, position // batch_size)``; only this rank's batches, and only
    their members' data is read from a local tar (the others' bytes are skipped: ``_lazy_members``)."""
    import webdataset as wds

    rank, world = ranks or wds.utils.pytorch_worker_info()[:2]
    seen = 0
    for item in items:
        s = item["__shard__"]
        path = _plain_local_tar(item["url"])
        with contextlib.ExitStack() as stack:  # the owned members are read through one handle per shard
            f = stack.enter_context(open(path, "rb")) if path is not None else None
            for i, rec in enumerate(_tar_samples([{"url": item["url"]}], lazy=True)):
                if limit is not None and seen >= limit:
                    return
                seen += 1
                k = i // batch_size
                if (s + k) % world == rank:
                    rec = read_members(rec, f)
                    rec["__batch__"] = (s, k)
                    yield rec


def _keyed_batches(records: Iterable[dict]) -> Iterator[dict]:
    """Group consecutive records of one batch key into ``{"image", "label", "skipped", "key"}``."""
    key, images, labels, skipped = None, [], [], Counter()
    logged: set = set()

    def emit():
        return {"image": torch.stack(images) if images else torch.empty(0),
                "label": torch.tensor(labels, dtype=torch.long), "skipped": dict(skipped), "key": key}

    for r in records:
        if r["__batch__"] != key:
            if key is not None:
                yield emit()
            key, images, labels, skipped = r["__batch__"], [], [], Counter()
        if _count_skip(r, skipped, logged):
            continue
        images.append(r["image"])
        labels.append(r["label"])
    if key is not None:
        yield emit()


def index_tar(path: str) -> list[dict]:
    """The samples of a local tar from its headers alone (no image is read): a list of ``{"key", "members": {ext:
    (offset, size)}}`` in file order, grouped as webdataset groups them (``base_plus_ext``, lower-case extension),
    plus ``{"__skip__": "tar_error"}`` entries for a sample with a repeated member, a member cut short, an unreadable
    header or a missing end-of-archive marker (each counted, as the streaming reader counts them)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    out: list[dict] = []
    cur: dict | None = None

    def close():
        if cur is not None:
            out.append(cur if "__bad__" not in cur else _skip("tar_error", cur["key"], path))

    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if cur is None or cur["key"] != key:
                    close()
                    cur = {"key": key, "members": {}}
                if ext in cur["members"] or m.offset_data + m.size > size:
                    cur["__bad__"] = True
                cur["members"][ext] = (m.offset_data, m.size)
    except Exception as e:  # tarfile.ReadError, EOFError, OSError for a truncated or unreadable shard
        log.warning("shard %s: unreadable from here on (%s); counted as tar_error", path, type(e).__name__)
        close()
        cur = None
        out.append(_skip("tar_error", "", path))
    close()
    if _truncated_local_tar(path) and not (out and out[-1].get("__skip__") == "tar_error"):
        out.append(_skip("tar_error", "", path))
    return out


class TrainStream(torch.utils.data.IterableDataset):
    """Endless resampled training stream whose position can be *sought*, not replayed.

    Each (rank, worker) stream is a sequence of blocks. Block ``b`` draws shards with replacement from a generator
    seeded by ``(seed, epoch, rank, worker, b)`` until it holds ``shuffle_buffer`` samples (at least one shard, at
    most 64) and visits their samples in a permutation from the same generator. A block's content is therefore a
    function of those five numbers and the shards' headers, and a stream position is ``(block, offset)``: each batch
    carries ``cursor = (worker, block, offset after its last sample)``, and ``seek`` restarts every worker there by
    reading one block's tar headers, decoding nothing before it. Per-sample augmentation randomness is seeded from the
    sample's position, so it is the same whether the stream ran through or was sought (and whatever the workers).

    Every rank yields the same number of full batches (``batches_per_epoch``, or as many as the trainer asks for), so
    DDP never hangs on a short rank, whatever the number of shards (webdataset issues #225/#303: resampling + a fixed
    epoch length is the maintainers' recipe). Shards that are not local files fall back to webdataset's streaming
    reader (shard draws per ``(seed, epoch, rank, worker)``, a shuffle buffer), which cannot seek.
    """

    MAX_SHARDS_PER_BLOCK = 64

    def __init__(self, urls, transform, batch_size, num_classes=None, seed=0, shuffle_buffer=1000,
                 batches_per_worker=None, draft_size=None, decode="tensor", source=None):
        super().__init__()
        self.source = source or (os.path.dirname(urls[0]) if urls else "?")
        self.draft_size, self.tensor_transform = draft_size, _tensor_path(transform, decode)
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.num_classes, self.seed, self.shuffle_buffer = num_classes, seed, shuffle_buffer
        self.batches_per_worker = batches_per_worker
        self.epoch = 0
        self.cursors: dict[int, tuple[int, int]] = {}
        self.rotation = 0
        self.local = all(_local_path(u) for u in self.urls)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def seekable(self) -> bool:
        return self.local and self.batches_per_worker is None

    def seek(self, cursors: dict[int, tuple[int, int]], rotation: int = 0) -> None:
        """Start worker stream ``w`` at ``cursors[w] = (block, offset)``; the DataLoader's worker ``i`` plays stream
        ``(i + rotation) % num_workers`` (a resumed loader's first batch must come from the stream that was next)."""
        if not self.seekable:
            raise RuntimeError("this training stream cannot seek (remote shards or a fixed epoch length)")
        self.cursors = {int(k): (int(v[0]), int(v[1])) for k, v in cursors.items()}
        self.rotation = int(rotation)

    def _block(self, rank: int, stream: int, b: int, index, drawn: set | None = None) -> list[tuple[str, dict]]:
        import random

        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{stream}/{b}")
        entries: list[tuple[str, dict]] = []
        for _ in range(self.MAX_SHARDS_PER_BLOCK):
            url = self.urls[rng.randrange(len(self.urls))]
            if drawn is not None:
                drawn.add(url)
            entries.extend((url, e) for e in index(url))
            if len(entries) >= self.shuffle_buffer:
                break
        rng.shuffle(entries)
        return entries

    def _positioned(self, rank: int, stream: int) -> Iterator[dict]:
        """Samples (decoded or skip records) of one worker stream from its cursor, each with ``__pos__``."""
        import functools
        import random

        index = functools.lru_cache(maxsize=256)(lambda url: index_tar(_local_path(url)))
        files: dict[str, object] = {}
        transform, n_cls, draft, tt = self.transform, self.num_classes, self.draft_size, self.tensor_transform
        b, off = self.cursors.get(stream, (0, 0))
        good, empty_blocks, drawn, skips = 0, 0, set(), Counter()
        try:
            while True:
                entries = self._block(rank, stream, b, index, drawn)
                for i in range(off, len(entries)):
                    url, e = entries[i]
                    pos = (stream, b, i + 1)
                    if "__skip__" in e:
                        skips[e["__skip__"]] += 1
                        yield {**e, "__pos__": pos}
                        continue
                    path = _local_path(url)
                    f = files.get(path)
                    if f is None:
                        if len(files) >= 16:
                            files.pop(next(iter(files))).close()
                        f = files[path] = open(path, "rb")
                    raw = {"__key__": e["key"], "__url__": url}
                    for ext, (o, n) in e["members"].items():
                        f.seek(o)
                        raw[ext] = f.read(n)
                    seed = random.Random(f"{self.seed}/{self.epoch}/{rank}/{stream}/{b}/{i}").getrandbits(63)
                    with _seeded(seed):
                        s = decode_sample(raw, transform, n_cls, draft, tt)
                    good += "__skip__" not in s
                    if "__skip__" in s:
                        skips[s["__skip__"]] += 1
                    yield {**s, "__pos__": pos}
                empty_blocks = 0 if good else empty_blocks + 1
                # a stream where nothing is usable must fail, not spin: once every shard has been drawn (or after
                # many blocks, whichever comes first) with no usable sample, name the folder and the skip reasons
                if not good and (len(drawn) == len(self.urls) or empty_blocks > max(16, 4 * len(self.urls))):
                    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skips.items())) or "the shards hold no samples"
                    raise NoUsableSamples(f"{self.source}: no usable training sample in a full pass over its "
                                          f"{len(self.urls)} shard(s) ({reasons})")
                b, off = b + 1, 0
        finally:
            for f in files.values():
                f.close()

    def __iter__(self):
        import itertools
        import random

        import webdataset as wds

        rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
        if self.local:
            stream = (worker + self.rotation) % max(1, nworkers)
            it = _batches(self._positioned(rank, stream), self.batch_size, partial=False)
        else:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")

            # A stream where nothing is usable must fail, not spin: count the records a full pass over every shard
            # produces (``raw`` when the last unseen shard has been expanded) and fail if at least that many records
            # have been decoded without one usable sample.
            watch = {"drawn": set(), "raw": 0, "pass": None, "seen": 0, "good": 0, "skips": Counter()}

            def fail():
                reasons = (", ".join(f"{k}={v}" for k, v in sorted(watch["skips"].items()))
                           or "the shards hold no samples")
                raise NoUsableSamples(f"{self.source}: no usable training sample in a full pass over its "
                                      f"{len(self.urls)} shard(s) ({reasons})")

            def shards(_=None):
                while True:
                    if watch["pass"] is None and len(watch["drawn"]) == len(self.urls):
                        watch["pass"] = watch["raw"]  # every shard has been expanded once
                        if watch["raw"] == 0:
                            fail()
                    url = self.urls[rng.randrange(len(self.urls))]
                    watch["drawn"].add(url)
                    yield {"url": url}

            def counted(src):
                for sample in src:
                    watch["raw"] += 1
                    yield sample

            def checked(src):
                for sample in src:
                    watch["seen"] += 1
                    reason = sample.get("__skip__")
                    if reason is None:
                        watch["good"] += 1
                    else:
                        watch["skips"][reason] += 1
                        if not watch["good"] and watch["pass"] is not None and watch["seen"] >= watch["pass"]:
                            fail()
                    yield sample

            transform, n_cls, draft, tt = self.transform, self.num_classes, self.draft_size, self.tensor_transform
            pipeline = wds.DataPipeline(
                shards,
                _tar_samples,
                counted,
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                            rng=random.Random(rng.random())),
                wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, n_cls, draft, tt)),
                checked,
                lambda src: _batches(src, self.batch_size, partial=False),
            )
            it = iter(pipeline)
        if self.batches_per_worker is not None:
            it = itertools.islice(it, self.batches_per_worker)
        yield from it


class _seeded:
    """Seed python's and torch's CPU generators for one sample's augmentation, restoring them afterwards (in the
    main process they are the trainer's)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import random

        self.py, self.pt = random.getstate(), torch.get_rng_state()
        random.seed(self.seed)
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        import random

        random.setstate(self.py)
        torch.set_rng_state(self.pt)
        return False


def make_train_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                      seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                      batches_per_epoch: int | None = None, draft_size: int | None = None,
                      decode: str = "tensor", source: str | None = None) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over a ``TrainStream`` (batched in the workers); ``loader.dataset.set_epoch(e)`` re-seeds it.

    ``decode``: ``tensor`` (default for training: torchvision decoding and tensor resize, PIL where the transform
    needs it) or ``pil``.

    With ``batches_per_epoch`` every rank yields exactly that many batches per pass (split evenly over workers).
    """
    per_worker = None
    if batches_per_epoch is not None:
        if batches_per_epoch % max(1, num_workers):
            raise ValueError(f"batches_per_epoch {batches_per_epoch} must be divisible by num_workers {num_workers}")
        per_worker = batches_per_epoch // max(1, num_workers)
    ds = TrainStream(urls, transform, batch_size, num_classes, seed, shuffle_buffer, per_worker, draft_size, decode,
                     source=source)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)

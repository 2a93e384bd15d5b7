"""WebDataset streams for training and evaluation, with faults counted inside the stream.

Every batch is a dict ``{"image": float32[B,3,H,W] in [0,1], "label": int64[B], "skipped": {reason: count}}``.
A sample that cannot be used (undecodable image, missing image or label, bad label, truncated tar) becomes a skip
record that travels down the same stream as the good samples, so the counts survive DataLoader worker processes and
reach the report. Nothing is dropped silently.
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image

from .shards import IMAGE_KEYS
from .transforms import as_tensor_transform

__all__ = ["decode_sample", "make_eval_loader", "make_train_loader", "TrainStream", "index_tar", "merge_skips",
           "SKIP_REASONS"]

log = logging.getLogger(__name__)

DECODERS = ("pil", "tensor")
SKIP_REASONS = ("missing_image", "missing_label", "bad_label", "label_out_of_range", "decode_error", "tar_error")


def _skip(reason: str, key: str = "", url: str = "") -> dict:
    return {"__skip__": reason, "__key__": key, "__url__": url}


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
    if tensor_transform is not None and not draft_size:
        from torchvision.io import ImageReadMode, decode_image

        try:  # an empty buffer fails in frombuffer, corrupt/truncated/unknown data in decode_image
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


def _tar_samples(urls: Iterable[dict]) -> Iterator[dict]:
    """Expand shards into samples; a broken tar yields one ``tar_error`` skip and the stream moves on."""
    from webdataset.tariterators import tarfile_samples

    for item in urls:
        url = item["url"]
        try:
            for s in tarfile_samples([dict(item)]):
                yield s
        except Exception as e:  # tarfile.ReadError, EOFError, OSError for truncated or unreadable shards
            log.warning("shard %s: unreadable from here on (%s); counted as tar_error", url, type(e).__name__)
            yield _skip("tar_error", "", url)
            continue
        if _truncated_local_tar(url):
            log.warning("shard %s: no end-of-archive marker (truncated); counted as tar_error", url)
            yield _skip("tar_error", "", url)


def _truncated_local_tar(url: str) -> bool:
    """Python's tarfile stops silently when a file is cut at a header; a complete tar ends with 2 zero blocks."""
    path = url[len("file://"):] if url.startswith("file://") else url
    if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def _batches(samples: Iterable[dict], batch_size: int, partial: bool = True) -> Iterator[dict]:
    images, labels, skipped = [], [], Counter()
    logged: set = set()
    pos = None
    for s in samples:
        pos = s.get("__pos__", pos)
        reason = s.get("__skip__")
        if reason is not None:
            skipped[reason] += 1
            if reason not in logged:
                logged.add(reason)
                log.warning("skipping sample %r in %s: %s (further '%s' skips are counted, not logged)",
                            s.get("__key__"), s.get("__url__"), reason, reason)
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


def merge_skips(total: Counter, batch: dict) -> None:
    for k, v in batch.get("skipped", {}).items():
        total[k] += v


def _tensor_path(transform: Callable, decode: str) -> Callable | None:
    if decode not in DECODERS:
        raise ValueError(f"unknown decode {decode!r}; valid: {', '.join(DECODERS)}")
    return as_tensor_transform(transform) if decode == "tensor" else None


def make_eval_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                     num_workers: int = 0, draft_size: int | None = None, decode: str = "pil"
                     ) -> torch.utils.data.DataLoader:
    """Every sample exactly once across ranks and workers, in shard order (batched inside the workers).

    ``decode``: ``pil`` (default: exactly timm's and RobustBench's PIL preprocessing) or ``tensor`` (torchvision
    decoding and tensor resize, ``decode_sample``'s ``tensor_transform``; PIL where the transform needs it)."""
    import webdataset as wds

    tt = _tensor_path(transform, decode)

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        _tar_samples,
        wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, num_classes, draft_size, tt)),
        lambda src: _batches(src, batch_size, partial=True),
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers)


def _local_path(url: str) -> str | None:
    path = url[len("file://"):] if url.startswith("file://") else url
    return path if "://" not in path and not path.startswith("pipe:") and os.path.isfile(path) else None


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
                 batches_per_worker=None, draft_size=None, decode="tensor"):
        super().__init__()
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

    def _block(self, rank: int, stream: int, b: int, index) -> list[tuple[str, dict]]:
        import random

        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{stream}/{b}")
        entries: list[tuple[str, dict]] = []
        for _ in range(self.MAX_SHARDS_PER_BLOCK):
            url = self.urls[rng.randrange(len(self.urls))]
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
        good, empty_blocks = 0, 0
        try:
            while True:
                entries = self._block(rank, stream, b, index)
                for i in range(off, len(entries)):
                    url, e = entries[i]
                    pos = (stream, b, i + 1)
                    if "__skip__" in e:
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
                    yield {**s, "__pos__": pos}
                empty_blocks = 0 if good else empty_blocks + 1
                if empty_blocks > max(16, 4 * len(self.urls)):
                    raise RuntimeError(f"training stream: no decodable sample in {empty_blocks} blocks of shards "
                                       f"from {self.urls[0]} ...")
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

            def shards(_=None):
                while True:
                    yield {"url": self.urls[rng.randrange(len(self.urls))]}

            transform, n_cls, draft, tt = self.transform, self.num_classes, self.draft_size, self.tensor_transform
            it = iter(wds.DataPipeline(
                shards,
                _tar_samples,
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                            rng=random.Random(rng.random())),
                wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, n_cls, draft, tt)),
                lambda src: _batches(src, self.batch_size, partial=False),
            ))
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
                      decode: str = "tensor") -> torch.utils.data.DataLoader:
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
    ds = TrainStream(urls, transform, batch_size, num_classes, seed, shuffle_buffer, per_worker, draft_size, decode)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)

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

__all__ = ["decode_sample", "make_eval_loader", "make_train_loader", "merge_skips", "SKIP_REASONS"]

log = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "missing_label", "bad_label", "label_out_of_range", "decode_error", "tar_error")


def _skip(reason: str, key: str = "", url: str = "") -> dict:
    return {"__skip__": reason, "__key__": key, "__url__": url}


def decode_sample(sample: dict, transform: Callable, num_classes: int | None = None) -> dict:
    """Raw tar sample -> ``{"image", "label"}`` or a skip record naming the reason."""
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
    try:
        with Image.open(io.BytesIO(sample[img_key])) as im:
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
    for s in samples:
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
            yield {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long),
                   "skipped": dict(skipped)}
            images, labels, skipped = [], [], Counter()
    if (images and partial) or skipped:
        if images and not partial:
            images, labels = [], []
        yield {"image": torch.stack(images) if images else torch.empty(0),
               "label": torch.tensor(labels, dtype=torch.long), "skipped": dict(skipped)}


def merge_skips(total: Counter, batch: dict) -> None:
    for k, v in batch.get("skipped", {}).items():
        total[k] += v


def make_eval_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                     num_workers: int = 0) -> torch.utils.data.DataLoader:
    """Every sample exactly once across ranks and workers, in shard order."""
    import webdataset as wds

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        _tar_samples,
        wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, num_classes)),
        lambda src: _batches(src, batch_size, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)


def make_train_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                      seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                      ) -> torch.utils.data.DataLoader:
    """An endless, resampled, shuffled stream of full batches (the trainer decides how many steps to draw).

    Shards are resampled with a deterministic seed per rank and worker, so every rank draws the same number of
    batches and a run with the same seed sees the same data.
    """
    import webdataset as wds

    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0

    def shards(_=None):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        yield from wds.ResampledShards(urls, seed=seed + 1000 * rank + wid, deterministic=True)

    pipeline = wds.DataPipeline(
        shards,
        _tar_samples,
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=None, seed=seed + rank),
        wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, num_classes)),
        lambda src: _batches(src, batch_size, partial=False),
    )
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers)
